"""tq-chat in a real terminal (pexpect): streaming, /stats, /save + /load, Ctrl-C, Ctrl-D."""

import os
import re
import shlex
import shutil
import sys

import pexpect
import pexpect.popen_spawn
import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
PROMPT = ">> "
Q1, Q2 = "What is the capital of France?", "And of Germany?"
TIMEOUT = 120


class Terminal(pexpect.popen_spawn.PopenSpawn):
    """tq-chat on a real pseudo-terminal made by script(1), started with subprocess (vfork + exec).

    pexpect.spawn would fork this test process, and once OpenBLAS 0.3.21's thread pool has run
    (earlier model tests), its fork handler deadlocks in blas_thread_shutdown_.  Bytes sent here
    reach the pty's line discipline, so ^C raises SIGINT and ^D is end-of-file, as at a keyboard.
    """

    def sendintr(self):
        self.send("\x03")

    def sendeof(self):
        self.send("\x04")

    def close(self):
        self.wait()


def spawn(tmp_path, *args):
    if shutil.which("script") is None:
        pytest.skip("script(1) from util-linux is needed to run tq-chat on a pseudo-terminal")
    env = dict(os.environ, TQ_MLX_CACHE=str(tmp_path / "cache"), TERM="dumb", PYTHONUNBUFFERED="1")
    if os.path.exists(OPENBLAS) and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = OPENBLAS
    cmd = "stty cols 400 rows 50; exec " + shlex.join([sys.executable, "-m", "tq_mlx.chat.cli", *args])
    child = Terminal(
        ["script", "-qfec", cmd, "/dev/null"], env=env, cwd=str(tmp_path), encoding="utf-8", timeout=TIMEOUT
    )
    child.expect("Loading smollm2-135m")
    child.expect(PROMPT)
    return child


def ask(child, text) -> str:
    """Send a line, return what was printed before the next prompt (without the echo)."""
    child.sendline(text)
    child.expect_exact(text)
    child.expect(PROMPT)
    return child.before.strip()


def without_speed(output: str) -> str:
    """The answer without the speed line (its timings differ from run to run)."""
    return "\n".join(line for line in output.splitlines() if not line.startswith("[prompt:"))


def quit_(child):
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_streams_an_answer_with_the_default_model(tmp_path):
    child = spawn(tmp_path, "--max-tokens", "10")
    child.sendline(Q1)
    child.expect_exact(Q1)
    child.expect(r"\S")  # the first piece of the answer arrives before the whole answer
    child.expect(PROMPT)
    answer = (child.after + child.before).strip()
    assert "Paris" in child.before
    assert re.search(
        r"\[prompt: \d+ tokens, [\d.]+ tok/s \| generation: \d+ tokens, [\d.]+ tok/s \| first token "
        r"[\d.]+ s \| KV [\d.]+ MiB",
        answer,
    ), answer
    quit_(child)


def test_stats_figures_match_the_cache(tmp_path):
    child = spawn(tmp_path, "--max-tokens", "6")
    answer = ask(child, Q1)
    stats = ask(child, "/stats")
    quit_(child)
    tokens = int(re.search(r"tokens in context: (\d+)", stats).group(1))
    kv = re.search(r"KV ([\d.]+) MiB, uncompressed: tokens stay exact until the cache holds 256", stats).group(1)
    prefill, decode = map(int, re.search(r"prompt: (\d+) tokens.*generation: (\d+) tokens", stats).groups())
    assert re.search(r"peak memory \d+\.\d+ GB", stats)

    import tq_mlx
    from tq_mlx.chat.session import Session
    from tq_mlx.models import load

    s = Session(*load(), max_tokens=6)
    assert "".join(s.ask(Q1)).strip() == answer.splitlines()[0].strip()
    ref = s.stats()
    assert tokens == ref["tokens"] and kv == f"{ref['kv_bytes'] / 2**20:.2f}"
    assert ref["kv_bytes"] == tq_mlx.cache_nbytes(s.cache)
    assert prefill + decode == tokens


def test_save_restart_load_continues_identically(tmp_path):
    flags = ["--max-tokens", "5", "--temp", "0.8", "--seed", "11"]
    child = spawn(tmp_path, *flags)
    ask(child, Q1)
    assert "saved" in ask(child, "/save session")
    uninterrupted = ask(child, Q2)
    quit_(child)

    child = spawn(tmp_path, *flags)
    assert "loaded 2 messages" in ask(child, "/load session")
    resumed = ask(child, Q2)
    quit_(child)
    assert resumed and without_speed(resumed) == without_speed(uninterrupted)


def test_ctrl_c_stops_an_answer_and_the_next_question_works(tmp_path):
    child = spawn(tmp_path, "--max-tokens", "400")
    child.sendline("Write a very long story about a dragon.")
    child.expect_exact("dragon.")
    child.expect(r"\w+\W+\w+")  # the answer is streaming
    child.sendintr()
    child.expect_exact("[interrupted]", timeout=30)
    child.expect(PROMPT)
    child.sendline("/stats")
    child.expect(r"generation: (\d+) tokens")
    assert int(child.match.group(1)) < 400
    child.expect(PROMPT)
    answer = ask(child, Q1)
    assert "Paris" in answer
    quit_(child)


def test_ctrl_d_exits_cleanly(tmp_path):
    child = spawn(tmp_path)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
    assert "Traceback" not in child.before


def test_save_and_load_failures_print_one_line_and_the_chat_goes_on(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    child = spawn(tmp_path, "--max-tokens", "8")
    ask(child, Q1)
    before = re.search(r"tokens in context: \d+", ask(child, "/stats")).group(0)
    for command, expect in [
        (f"/save {tmp_path}/no/such/folder/s", "cannot save: cannot write"),
        ("/save /proc/s", "cannot save: cannot write"),  # a read-only file system, even for root
        (f"/load {corrupt}", "cannot load"),
        (f"/load {tmp_path}/missing", "cannot load"),
    ]:
        out = ask(child, command)
        assert out.startswith(expect) and len(out.splitlines()) == 1 and "Traceback" not in out, out
    assert before in ask(child, "/stats")  # nothing lost
    assert "saved" in ask(child, f"/save {tmp_path}/ok")  # and saving still works
    quit_(child)
    assert not list(tmp_path.glob("**/*.tmp.safetensors"))
