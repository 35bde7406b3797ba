"""Launches, host syncs and bytes of one decode step of one layer, counted without a Mac.

The step (update_and_fetch of one token, then attention) is traced, which builds the graph MLX
would run without running it: a host sync (.item(), .tolist(), mx.eval) inside the step raises
while tracing, so a step that traces has none.  The kernel path is traced by mx.export_function
(custom kernels trace there on any back-end); the reference path by mx.compile (its outputs are
never evaluated), since export_function cannot write the mx.compile'd helpers it calls.  Custom kernels trace
on any back-end (nothing runs), so the Metal kernel path is traced as it would run on a Mac.
Counted as launches: every primitive except those that only make views on Metal (reshape,
slice, broadcast, expand/squeeze dims, transpose, as_strided); a custom kernel is one launch.
Not visible in the graph: a copy MLX adds at run time for a non-contiguous custom-kernel
input; the kernel path passes the stores' full, contiguous buffers, so it adds none.

mlx-lm's fp cache is not traced (on the CPU its SDPA expands into many ops): on Metal a decode
step of it is two slice updates (keys, values) and sdpa_vector, one launch, or its two-pass
variant from 1024 keys, two launches (MLX 0.32's dispatch).
"""

import collections
import copy
import os
import re
import tempfile

import mlx.core as mx

VIEW_ONLY = {
    "Broadcast",
    "Reshape",
    "Slice",
    "ExpandDims",
    "Squeeze",
    "Flatten",
    "Unflatten",
    "Transpose",
    "AsStrided",
    "StopGradient",
}


def fp_cache_launches(T: int) -> int:
    """Launches of one decode step of mlx-lm's fp cache on Metal at T keys (see the module docstring)."""
    return 2 + (1 if T < 1024 else 2)


def _primitives(dot: str):
    return re.findall(r'label ="(\w+)"', dot)


def trace_step(cache, queries, keys, values, scale, mode: str):
    """Primitives of one decode step on a deep copy of `cache` (cache untouched), traced with
    TQ_MLX_ATTENTION=mode: a Counter of launching primitives, and the list of all primitives."""
    from tq_mlx import kernels
    from tq_mlx.attention import attention

    work = copy.deepcopy(cache)
    mx.eval([a for st in (work.exact, work.sink, work.codes, work.window) for a in st.buffers.values()])
    prims = []

    def step(q, k, v):
        work.update_and_fetch(k, v)
        out = attention(work, q, scale)
        outs = [out, *[a for st in (work.exact, work.sink, work.codes, work.window) for a in st.buffers.values()]]
        with tempfile.TemporaryDirectory() as d:
            mx.export_to_dot(os.path.join(d, "g.dot"), *outs)
            prims.extend(_primitives(open(os.path.join(d, "g.dot")).read()))
        return out

    old = os.environ.get("TQ_MLX_ATTENTION")
    os.environ["TQ_MLX_ATTENTION"] = mode
    try:
        with kernels.trusted(), tempfile.TemporaryDirectory() as d:
            if mode == "metal":  # custom kernels only trace inside export_function on a CPU-only MLX
                mx.export_function(os.path.join(d, "step.mlxfn"), step, queries, keys, values)
            else:  # the reference path calls mx.compile'd helpers, which export_function cannot write
                mx.compile(step)(queries, keys, values)
    finally:
        if old is None:
            os.environ.pop("TQ_MLX_ATTENTION", None)
        else:
            os.environ["TQ_MLX_ATTENTION"] = old
    launches = collections.Counter(p for p in prims if p not in VIEW_ONLY)
    return launches, prims


def kv_bytes_read(cache) -> int:
    """Bytes of K/V a decode step reads: the held codes (and norms) and fp16 tokens."""
    total = 0
    for b in cache.blocks():
        for enc in (b.k, b.v):
            for a in enc.values():
                total += a.nbytes
    return total
