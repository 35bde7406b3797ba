"""Tensor parallelism across real processes: 3 local ranks on MLX's ring backend run SmolLM2 (3 KV heads,
one per rank) sharded with mlx-lm's `model.shard`, as `mlx.launch --backend ring -n 3` starts them.

The ranks share 2 CPU cores here, so each collective costs tens of milliseconds: the runs are a short
prompt and a few tokens.  Greedy k4v4 text is compared exactly: at these tokens the top logit leads the
next by far more than the float noise of a sharded matmul's other summation order (a near-tie would
show as a differing token, not as a silently passing test)."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest

import tq_mlx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
BIN = Path(sys.executable).parent
TIMEOUT = 240  # seconds any one launch may take before the test fails (a hang is a failure, not a wait)
Q = "What is the capital of France?"
KV = ["--kv", "k4v4", "--kv-quant-start", "16"]  # compress from token 16: the short prompt is coded
PER_RANK = re.compile(r"^KV cache: ([\d.]+) MB .*; per rank: ([\d, ]+) bytes$", re.MULTILINE)

pytestmark = pytest.mark.skipif(not (BIN / "mlx.launch").exists(), reason="mlx.launch is not installed")
# a launch each, about a minute each on 2 shared cores (in-process versions: test_tensor_parallel_cache.py)
more = pytest.mark.slow


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if os.path.exists(OPENBLAS) and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = OPENBLAS
    return env


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(n, command, *args, stdin=None):
    """`mlx.launch --backend ring -n n` of a tq-* console script; the CompletedProcess (text)."""
    (port,) = _free_ports(1)
    cmd = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", str(n), "-p", str(port)]
    cmd += ["--python", sys.executable, str(BIN / command), *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)


def single(command, *args, stdin=None):
    """The same console script in one process."""
    return subprocess.run(
        [str(BIN / command), *args], input=stdin, capture_output=True, text=True, env=_env(), timeout=TIMEOUT
    )


def answer(stdout):
    """The generated text between mlx_lm.generate's two ========== lines."""
    return stdout.split("==========\n")[1]


def test_three_ranks_print_the_single_process_text_each_holding_a_third_of_the_cache():
    args = ["--prompt", Q, *KV, "--max-tokens", "6"]
    one, three = single("tq-generate", *args), launch(3, "tq-generate", *args)
    assert one.returncode == 0 and three.returncode == 0, three.stderr
    assert answer(three.stdout) == answer(one.stdout) and "Paris" in answer(one.stdout)
    mb, per_rank = PER_RANK.search(three.stdout).groups()
    per_rank = [int(b) for b in per_rank.split(",")]
    assert len(per_rank) == 3 and len(set(per_rank)) == 1  # one KV head each
    # together: the single-process bytes, plus a copy of each layer's RoPE map (centred keys) in every other rank
    one_mb = float(re.search(r"KV cache: ([\d.]+) MB for", one.stdout).group(1))
    layer_wide = 30 * 1.5e-3  # SmolLM2's 30 layers: partner, angle and scale (d each) and their pairs form
    assert one_mb <= float(mb) <= one_mb + 2 * layer_wide
    assert three.stdout.count("==========") == 2  # printed once, by rank 0


class _Group:
    """The (rank, size) a per-rank file name says, for load_prompt_cache's check."""

    def __init__(self, path):
        m = re.search(r"\.rank(\d+)-of-(\d+)\.", str(path))
        self.r, self.n = (int(m[1]), int(m[2])) if m else (0, 1)

    def rank(self):
        return self.r

    def size(self):
        return self.n


def _agree(a, b) -> float:
    """The share of equal 4-bit codes in two codes stores' packed words."""
    n = 0
    for name in a:
        if "codes" in name:
            x, y = a[name].astype(mx.uint32), b[name].astype(mx.uint32)
            n += sum(mx.mean((x >> (4 * j)) & 15 == (y >> (4 * j)) & 15).item() for j in range(8)) / 8
    return n / sum("codes" in name for name in a)


@pytest.mark.slow
@more
def test_three_rank_cache_files_hold_the_single_process_codes_head_by_head(tmp_path):
    """Layer 0 (the same embeddings in) codes bit for bit alike; deeper layers' inputs carry the float noise of
    the sharded sums (and the code flips it causes), so there the codes agree mostly, where another head's
    rotation would agree at chance (the control)."""
    args = ["--prompt", Q, *KV]
    one = single("tq-cache-prompt", *args, "--prompt-cache-file", str(tmp_path / "one.safetensors"))
    three = launch(3, "tq-cache-prompt", *args, "--prompt-cache-file", str(tmp_path / "tp.safetensors"))
    assert one.returncode == 0 and three.returncode == 0, three.stderr
    files = sorted(tmp_path.glob("tp.rank*-of-3.safetensors"))
    assert [f.name for f in files] == [f"tp.rank{r}-of-3.safetensors" for r in range(3)]
    whole = tq_mlx.load_prompt_cache(tmp_path / "one.safetensors")
    ranks = [tq_mlx.load_prompt_cache(f, group=_Group(f)) for f in files]
    assert all(isinstance(c, tq_mlx.TurboQuantKVCache) and c.calibrated for c in whole)
    for r, cache in enumerate(ranks):
        head = [{n: a[:, r : r + 1] for n, a in w.codes.view().items()} for w in whole]
        other = [{n: a[:, (r + 1) % 3 : (r + 1) % 3 + 1] for n, a in w.codes.view().items()} for w in whole]
        assert [c.shard for c in cache] == [(r, 3, r)] * len(whole)
        assert _agree(cache[0].codes.view(), head[0]) == 1.0
        assert min(_agree(c.codes.view(), h) for c, h in zip(cache, head)) > 0.5
        assert max(_agree(c.codes.view(), o) for c, o in zip(cache, other)) < 0.25


@contextlib.contextmanager
def generating(*args, n=3):
    """n ranks of tq-generate started as mlx.launch starts them (MLX_RANK, MLX_HOSTFILE), but by the test,
    so that it can kill or stop one; inside, the Popen objects once rank 0 has begun its answer (its first
    ========== line).  Every rank is killed on the way out."""
    hosts = Path(os.environ.get("TMPDIR", "/tmp")) / f"tq-ring-{os.getpid()}.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
    env = _env()
    ranks = [
        subprocess.Popen(
            [str(BIN / "tq-generate"), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env, MLX_RANK=str(r), MLX_HOSTFILE=str(hosts)),
        )
        for r in range(n)
    ]
    stuck = threading.Timer(TIMEOUT, lambda: [p.kill() for p in ranks])  # no answer begun: ends the wait below
    stuck.start()
    try:
        if not any(line.startswith("==========") for line in ranks[0].stdout):
            pytest.fail(f"rank 0 ended before generating: {ranks[0].stderr.read()}")
        stuck.cancel()
        yield ranks
    finally:
        stuck.cancel()
        for p in ranks:
            p.kill()
            p.wait()


def _ends(p, within):
    """(exit status, stderr) of a rank that must end within `within` seconds."""
    try:
        _, err = p.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank still ran {within} s after its peer went away: a hang")
    return p.returncode, err


LONG = ["--prompt", "Write a long story about a dragon.", "--kv", "k4v4", "--max-tokens", "200"]


def test_a_killed_rank_ends_the_others_with_an_error_naming_it():
    with generating(*LONG) as ranks:
        ranks[2].send_signal(signal.SIGKILL)
        for r in (0, 1):
            code, err = _ends(ranks[r], within=30)
            assert code == 1 and f"tq-generate (rank {r} of 3): the process of rank 2 ended" in err


@pytest.mark.slow
@more
def test_a_stalled_rank_ends_the_others_after_the_dist_timeout():
    with generating(*LONG, "--dist-timeout", "5") as ranks:
        ranks[1].send_signal(signal.SIGSTOP)  # alive, sockets open, no progress
        ends = [_ends(ranks[r], within=60) for r in (0, 2)]
        assert [code for code, _ in ends] == [1, 1]
        # the first rank whose watchdog fires ends; the other may hear of that first (liveness.py)
        said = [err for _, err in ends if "no progress for 5 s in a step shared with the other processes" in err]
        assert said and all(("no progress" in err or "the process of rank" in err) for _, err in ends)


@pytest.mark.slow
@more
def test_two_ranks_refuse_a_model_whose_three_kv_heads_do_not_split():
    two = launch(2, "tq-generate", "--prompt", Q, "--max-tokens", "2")
    assert re.search(r"Node with rank \d exited with code 1", two.stderr)  # mlx.launch itself exits 0
    assert re.search(r"tq-generate \(rank \d of 2\): layer 0 has 3 KV heads, which do not split over 2 ", two.stderr)
    assert "run this model on 1 or 3 processes" in two.stderr


def _reply(stdout):
    """tq-chat's first answer: after its first prompt, up to its first [...] status line."""
    return stdout.split(">> ", 1)[1].split("\n[", 1)[0]


@pytest.mark.slow
@more
def test_tq_chat_on_three_ranks_reads_on_rank_0_and_answers_as_one_process():
    lines = f"{Q}\n/stats\n/quit\n"
    args = ["--kv", "k4v4", "--max-tokens", "6", "--no-history"]
    one, three = single("tq-chat", *args, stdin=lines), launch(3, "tq-chat", *args, stdin=lines)
    assert one.returncode == 0 and three.returncode == 0, three.stderr
    assert _reply(three.stdout) == _reply(one.stdout) and "Paris" in _reply(one.stdout)
    assert "sharded over 3 processes" in three.stdout and three.stdout.count("Loaded ") == 1
    assert re.search(r"^KV [\d.]+ MiB \(([\d.]+) MiB, \1 MiB, \1 MiB per rank\)", three.stdout, re.MULTILINE)
