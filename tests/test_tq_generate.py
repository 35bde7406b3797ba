"""tq-generate and tq-cache-prompt end to end (console scripts in subprocesses, offline), and the
version check of the mlx-lm hook they share."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest

import tq_mlx
from tq_mlx.models import load, mlx_lm_hook, tq_generate

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
TIMEOUT = 300
Q = "What is the capital of France?"


def run(command, *args, stdin=None):
    """A tq-* console script, offline; the CompletedProcess (text)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if os.path.exists(OPENBLAS) and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = OPENBLAS
    exe = Path(sys.executable).with_name(command)
    return subprocess.run(
        [str(exe), *args], check=False, input=stdin, capture_output=True, text=True, env=env, timeout=TIMEOUT
    )


def stats(stdout):
    """mlx_lm.generate's stats lines, and the KV line tq-generate adds."""
    prompt = int(re.search(r"^Prompt: (\d+) tokens", stdout, re.MULTILINE).group(1))
    generation = int(re.search(r"^Generation: (\d+) tokens", stdout, re.MULTILINE).group(1))
    kv = re.search(
        r"^KV cache: ([\d.]+) MB for (\d+) tokens \(([^;]+); fp16 would take ([\d.]+) MB\)$", stdout, re.MULTILINE
    )
    return prompt, generation, kv


@pytest.mark.model
def test_answers_paris_offline_with_mlx_lm_output_and_the_kv_size():
    out = run("tq-generate", "--prompt", Q, "--kv", "k4v4", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    answer = out.stdout.split("==========")[1]
    assert "Paris" in answer
    prompt, generation, kv = stats(out.stdout)
    assert kv is not None, out.stdout
    assert int(kv.group(2)) == prompt + generation and kv.group(3) == "k4v4"
    assert 0 < float(kv.group(1))


@pytest.mark.model
def test_the_kv_line_reports_the_bytes_the_cache_holds():
    start = "The capital of France is"
    out = run("tq-generate", "--prompt", start, "--kv", "k4v3", "--max-tokens", "8", "--ignore-chat-template")
    assert out.returncode == 0, out.stderr
    prompt, generation, kv = stats(out.stdout)

    model, tokenizer = load()
    cache = tq_mlx.make_prompt_cache(model, "k4v3")
    ids = tokenizer.encode(start, add_special_tokens=True)
    mlx_lm.generate(model, tokenizer, ids, max_tokens=8, prompt_cache=cache)
    assert (len(ids), cache[0].offset) == (prompt, prompt + generation)
    assert kv.group(0) == tq_generate.kv_summary(cache)


@pytest.mark.model
def test_reads_the_prompt_from_stdin_with_a_system_prompt(smol):
    out = run(
        "tq-generate",
        "--prompt",
        "-",
        "--max-tokens",
        "12",
        "--verbose",
        "False",
        "--system-prompt",
        "You are a geography teacher.",
        stdin="What is the capital of France?\n",
    )
    assert out.returncode == 0, out.stderr
    assert "==========" not in out.stdout  # --verbose False: the answer only
    # a short prompt is kept exact: the answer of mlx-lm's own fp cache (whatever the model knows)
    from mlx_lm import generate
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = smol
    messages = [
        {"role": "system", "content": "You are a geography teacher."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    want = generate(model, tok, prompt, max_tokens=12, prompt_cache=make_prompt_cache(model))
    assert out.stdout.strip() == want.strip()


FACTS = "Some facts. The capital of France is Paris. The capital of Spain is Madrid."


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    """A k4v3 prompt-cache file of FACTS, made by tq-cache-prompt."""
    path = str(tmp_path_factory.mktemp("cache") / "facts.safetensors")
    made = run("tq-cache-prompt", "--prompt", FACTS, "--prompt-cache-file", path, "--kv", "k4v3")
    assert made.returncode == 0, made.stderr
    assert re.search(r"^KV cache: [\d.]+ MB for \d+ tokens \(k4v3;", made.stdout, re.MULTILINE)
    return path


@pytest.mark.model
def test_a_cache_file_from_tq_cache_prompt_is_reused(cache_file):
    model, tokenizer = load()
    cache = tq_mlx.load_prompt_cache(cache_file, model=model, config="k4v3")
    held = cache[0].offset
    assert isinstance(cache[0], tq_mlx.TurboQuantKVCache) and held > len(tokenizer.encode(FACTS))

    out = run(
        "tq-generate",
        "--prompt-cache-file",
        cache_file,
        "--prompt",
        " What is the capital of Spain?",
        "--max-tokens",
        "12",
    )
    assert out.returncode == 0, out.stderr
    prompt, generation, kv = stats(out.stdout)
    assert int(kv.group(2)) == held + prompt + generation  # only the question was prefilled
    assert kv.group(3) == "k4v3"


@pytest.mark.model
def test_a_cache_file_with_other_kv_settings_is_refused(cache_file):
    out = run("tq-generate", "--prompt-cache-file", cache_file, "--prompt", "Hi", "--kv", "k3v3")
    assert out.returncode == 1
    assert "saved with KV config 'k4v3', expected 'k3v3'" in out.stderr and "Traceback" not in out.stderr


def test_an_unknown_kv_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        tq_generate.main(["--kv", "k4v9"])
    assert e.value.code == 2
    assert "tq-generate: error:" in capsys.readouterr().err


def test_kv_bits_is_refused_in_favour_of_kv(capsys):
    with pytest.raises(SystemExit) as e:
        tq_generate.main(["--kv-bits", "4"])
    assert e.value.code == 2
    assert "--kv-bits" in capsys.readouterr().err


def test_help_lists_mlx_lm_flags_and_the_kv_flags(capsys):
    with pytest.raises(SystemExit) as e:
        tq_generate.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--model",
        "--prompt",
        "--max-tokens",
        "--temp",
        "--top-p",
        "--system-prompt",
        "--prompt-cache-file",
        "--verbose",
        "--kv ",
        "--kv-window",
        "--kv-boundary-layers",
    ):
        assert flag in help_text
    assert help_text.startswith("usage: tq-generate")


@pytest.mark.parametrize("version", ["0.32.1", "0.33.0", "1.0.0", "0.32.3rc1"])
def test_an_untested_mlx_lm_is_refused_with_the_tested_range(monkeypatch, capsys, version):
    monkeypatch.setattr(mlx_lm_hook, "mlx_lm_version", lambda: version)
    assert tq_generate.main(["--prompt", Q]) == 1
    err = capsys.readouterr().err
    assert f"mlx-lm {version}" in err and mlx_lm_hook.TESTED_RANGE in err


def test_the_installed_mlx_lm_is_in_the_tested_range():
    assert mlx_lm_hook.check_version() == mlx_lm_hook.mlx_lm_version()


def test_the_hook_restores_mlx_lm_after_a_run():
    import importlib

    module = importlib.import_module("mlx_lm.generate")
    names = ("make_prompt_cache", "load", "load_prompt_cache", "DEFAULT_MODEL", "argparse", "generate")
    before = {n: getattr(module, n) for n in names}
    with pytest.raises(SystemExit):
        tq_generate.main(["--kv", "nonsense"])
    assert {n: getattr(module, n) for n in names} == before
