"""Tensor parallelism for tq-mlx's commands on mx.distributed (`mlx.launch`, ring, JACCL, MPI).

Under a group of N > 1 processes every rank loads the model and shards it with mlx-lm's own
`model.shard(group)` (each rank keeps 1/N of the attention heads and MLP columns; `tq_mlx.make_prompt_cache`
then gives it a cache of its own KV heads, see `tq_mlx/sharding.py`).  Only rank 0 prints (`rank0_output`)
and reads input, which it broadcasts (`broadcast`); sampling seeds are shared (`share_seed`), so every
rank draws the same tokens.  A prompt-cache file is saved one file per rank (`rank_path`).
"""

import contextlib
import faulthandler
import io
import math
import os
import pickle
import random
import select
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from tq_mlx import sharding

from . import liveness

CONNECT_TIMEOUT = 120  # seconds mx.distributed.init may wait for the other ranks before the process exits
STDIN_IDLE = 2.0  # seconds of silence that end a piped prompt on rank 0 (mlx.launch never closes stdin)


def launched() -> bool:
    """Whether a distributed launcher (mlx.launch: ring or JACCL) started this process as one of a group."""
    return any(os.environ.get(v) for v in ("MLX_HOSTFILE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR"))


def world():
    """The global group, connecting to the other ranks the launcher started (a group of 1 without one).

    A rank that cannot reach the others within CONNECT_TIMEOUT exits with a traceback naming this
    function (mx.distributed.init holds the interpreter while it waits, so only faulthandler can stop it)."""
    if launched():
        faulthandler.dump_traceback_later(CONNECT_TIMEOUT, exit=True, file=sys.__stderr__)
    try:
        return mx.distributed.init()
    finally:
        if launched():
            faulthandler.cancel_dump_traceback_later()


def label(group) -> str:
    """ "" for a single process, else " (rank r of N)" for messages."""
    return "" if group.size() == 1 else f" (rank {group.rank()} of {group.size()})"


# ---- sharding the model ---------------------------------------------------------------------
def supported_architectures() -> list[str]:
    """mlx-lm model modules whose Model has `shard(group)` (tensor parallelism), from their source."""
    import mlx_lm.models

    folder = Path(mlx_lm.models.__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if "    def shard(self" in p.read_text(encoding="utf-8"))


def _heads(attn, names):
    return next((v for n in names if isinstance(v := getattr(attn, n, None), int)), None)


def check_divisible(model, n: int):
    """ValueError unless every attention layer's KV and query heads split evenly over n ranks."""
    for i, layer in enumerate(getattr(model, "layers", [])):
        attn = getattr(layer, "self_attn", None)
        kv = _heads(attn, sharding._HEAD_ATTRS)
        q = _heads(attn, ("n_heads", "num_attention_heads", "num_heads"))
        for what, h in (("KV", kv), ("query", q)):
            if h is not None and h % n:
                both = math.gcd(kv or 0, q or 0)
                ok = [d for d in range(1, both + 1) if both % d == 0]
                raise ValueError(
                    f"layer {i} has {h} {what} heads, which do not split over {n} processes: tensor parallelism "
                    f"gives each rank whole heads; run this model on {' or '.join(map(str, ok))} processes"
                )


def shard_model(model, group):
    """Shard `model` in place over `group` with mlx-lm's own `model.shard` and evaluate its weights;
    ValueError naming the architectures that can be sharded when this one cannot."""
    arch = getattr(getattr(model, "args", None), "model_type", type(model).__module__.rsplit(".", 1)[-1])
    if not callable(getattr(model, "shard", None)):
        raise ValueError(
            f"the {arch} architecture has no tensor-parallel sharding in mlx-lm, so it cannot run on "
            f"{group.size()} processes; mlx-lm shards: {', '.join(supported_architectures())}"
        )
    check_divisible(model, group.size())
    try:
        model.shard(group)
    except (ValueError, AssertionError) as e:
        raise ValueError(f"sharding {arch} over {group.size()} processes failed: {e}") from None
    mx.eval(model.parameters())
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # every rank is ready
    liveness.start(group, broadcast)  # from here a rank that dies ends the others at once


# ---- input on rank 0, shared ----------------------------------------------------------------
def settle():
    """Wait for the model's work in flight (mlx-lm's generate_step computes the next token ahead, on its
    own stream): its collectives must finish before one of ours starts, or ranks pair them differently."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


def gather_ints(values, group) -> list[list[int]]:
    """Every rank's list of ints (the same length on each), rank by rank."""
    settle()
    mine = mx.array([list(values)], dtype=mx.int64)
    return mx.distributed.all_gather(mine, group=group, stream=mx.cpu).tolist()


def broadcast(data, group):
    """Rank 0's `data` (any picklable object, None allowed) on every rank; the other ranks pass anything."""
    if group.size() == 1:
        return data
    settle()
    payload = pickle.dumps(data) if group.rank() == 0 else b""
    n = mx.distributed.all_sum(mx.array(len(payload)), group=group, stream=mx.cpu).item()
    buf = mx.array(np.frombuffer(payload, np.uint8)) if group.rank() == 0 else mx.zeros((n,), dtype=mx.uint8)
    buf = mx.distributed.all_sum(buf, group=group, stream=mx.cpu)
    return pickle.loads(np.array(buf).tobytes())


def share_seed(group, seed: int | None = None) -> int:
    """Seed mx.random identically on every rank (rank 0's `seed`, or a random one) and return it."""
    seed = broadcast(random.getrandbits(63) if seed is None else seed, group)
    mx.random.seed(seed)
    return seed


def read_stdin(stream=None, idle: float = STDIN_IDLE) -> str:
    """All of stdin up to EOF, or, when it is a pipe that stays open (mlx.launch forwards the launcher's
    stdin but never closes it), up to the first `idle` seconds without data once some has arrived."""
    stream = stream or sys.stdin
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return stream.read()
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], idle if chunks else None)
        if not ready:
            break
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode("utf-8", errors="replace")


# ---- output on rank 0 ----------------------------------------------------------------------
@contextlib.contextmanager
def rank0_output(group):
    """Inside: stdout of ranks other than 0 goes nowhere, at the file descriptor (so also what holds the
    original sys.stdout, and C code); stderr stays: errors name their rank."""
    if group.rank() == 0:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# ---- files -----------------------------------------------------------------------------------
def rank_path(path, group) -> str:
    """The file of this rank for prompt-cache file `path`: `path` itself for one process, else
    `stem.rank{r}-of-{N}.suffix` (each rank holds its own KV heads, each host writes its own file)."""
    if group.size() == 1:
        return str(path)
    p = Path(path)
    return str(p.with_name(f"{p.stem}.rank{group.rank()}-of-{group.size()}{p.suffix}"))
