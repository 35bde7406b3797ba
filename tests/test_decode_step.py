"""One decode step of one layer: no host sync, and few launches on the kernel path (bench/launches.py).

A step is traced with mx.export_function: any .item(), .tolist() or eval inside it raises there.
Custom kernels trace on any back-end, so the kernel path is counted as it would run on a Mac.
"""

import os

import mlx.core as mx
import pytest
from emu import emulated

import tq_mlx
from tq_mlx.attention import attention
from tq_mlx.bench.launches import fp_cache_launches, trace_step

LAUNCH_BUDGET = 8  # beyond mlx-lm's fp cache, per layer per decode step (update and attention together)


def _filled(config, H, D, T, metal, dtype=mx.float16, max_size=None, steps=3, **overrides):
    """A calibrated cache of T tokens then `steps` decode steps (through the kernels on the emulator
    when `metal`)."""
    cfg = tq_mlx.resolve_config(config, quant_start=0, **overrides)
    c = tq_mlx.TurboQuantKVCache(cfg, max_size=max_size)
    k = mx.random.normal((1, H, T, D), key=mx.random.key(T)).astype(dtype)
    old = os.environ.get("TQ_MLX_ATTENTION")
    os.environ["TQ_MLX_ATTENTION"] = "metal" if metal else "reference"
    try:
        with emulated(check_races=False):
            c.update_and_fetch(k, k)
            mx.eval(attention(c, mx.random.normal((1, 4 * H, T, D)).astype(dtype), D**-0.5, "causal"))
            for _ in range(steps):  # decode steps: a sliding window wraps its ring
                c.update_and_fetch(k[:, :, :1], k[:, :, :1])
                mx.eval(attention(c, mx.random.normal((1, 4 * H, 1, D)).astype(dtype), D**-0.5))
            mx.eval([a for st in (c.exact, c.sink, c.codes, c.window) for a in st.buffers.values()])
    finally:
        if old is None:
            os.environ.pop("TQ_MLX_ATTENTION")
        else:
            os.environ["TQ_MLX_ATTENTION"] = old
    return c


def _step_inputs(H, D, dtype=mx.float16):
    q = mx.random.normal((1, 4 * H, 1, D)).astype(dtype)
    k = mx.random.normal((1, H, 1, D)).astype(dtype)
    return q, k, k


@pytest.mark.parametrize(
    "config,overrides,max_size",
    [
        ("k4v4", {}, None),
        ("k4v3", {"fp_window": 16}, None),
        ("k3v3", {}, 200),  # a sliding window: its ring is written in place
    ],
)
def test_kernel_path_decode_step_has_no_host_sync_and_fits_the_launch_budget(config, overrides, max_size):
    H, D, T = 2, 128, 300
    cache = _filled(config, H, D, T, metal=True, max_size=max_size, **overrides)
    launches, prims = trace_step(cache, *_step_inputs(H, D), D**-0.5, "metal")
    assert launches["CustomKernel"] == 4  # tq_encode for K and V, tq_decode, tq_merge
    extra = sum(launches.values()) - fp_cache_launches(cache.size())
    assert extra <= LAUNCH_BUDGET, launches
    assert not {"Concatenate", "Copy"} & set(prims)  # nothing copies the cache


@pytest.mark.parametrize("steps,encodes", [(3, False), (15, True)])
def test_trellis_decode_steps_stage_without_host_sync_and_encode_every_16th(steps, encodes):
    H, D = 2, 128
    cache = _filled("k4v4-tcq", H, D, 300, metal=True, steps=steps)
    launches, _ = trace_step(cache, *_step_inputs(H, D), D**-0.5, "metal")
    # tq_decode, tq_merge; the 16th staged token also runs tq_viterbi for K and V (no host sync either)
    assert launches["CustomKernel"] == 2 + 2 * encodes
    assert "ArgReduce" not in launches  # no Viterbi search in MLX ops
    # measured beyond the fp cache: 1 (staging: the window written), 7 (encoding: + tq_viterbi x 2, the codes
    # and norms of K and V written; the emptied window keeps its buffers)
    assert sum(launches.values()) - fp_cache_launches(cache.size()) <= LAUNCH_BUDGET, launches
    assert not {"Concatenate", "Copy"} & set(launches)


@pytest.mark.parametrize("config", ["k4v4", "k4v4-fast", "2.5", "hqmq-s24r3", "fp16", "k4v4-tcq"])
def test_reference_path_decode_step_has_no_host_sync(config):
    H, D = 2, 64
    cache = _filled(config, H, D, 40, metal=False, fp_window=4)
    launches, _ = trace_step(cache, *_step_inputs(H, D, mx.float32), 0.125, "reference")
    assert sum(launches.values()) > 0


def test_a_prefill_chunk_is_validated_at_once():
    cache = tq_mlx.TurboQuantKVCache("k4v4")
    k = mx.random.normal((1, 2, 8, 64))
    with pytest.raises(ValueError, match="non-finite"):
        cache.update_and_fetch(k, k / 0)
    assert cache.empty()


def test_nan_from_a_decode_step_is_reported_at_the_next_prefill_and_save():
    cache = _filled("k4v4", 1, 64, 20, metal=False)
    bad = mx.full((1, 1, 1, 64), float("nan"))
    cache.update_and_fetch(bad, bad)  # a decode step: no sync, no check
    attention(cache, mx.zeros((1, 1, 1, 64)), 0.125)
    with pytest.raises(ValueError, match="earlier decode step were NaN or inf"):
        cache.update_and_fetch(mx.zeros((1, 1, 4, 64)), mx.zeros((1, 1, 4, 64)))
    with pytest.raises(ValueError, match="earlier decode step"):
        _ = cache.state
    cache.trim(1)
    cache.check_finite()  # trimming the bad token back out makes the cache usable again


@pytest.mark.parametrize("new_block", [False, True])
def test_rope_centred_decode_step_has_no_host_sync_and_one_more_kernel(new_block):
    """-rope: tq_rope_bias before tq_decode.  The block's turned mean, which tq_encode takes off, is made
    on the host once per 16 positions (the step that opens a block) and kept for the others: no launch."""
    import mlx.nn as nn

    from tq_mlx.rope_mean import probe

    H, D, T = 2, 128, 300
    cfg = tq_mlx.resolve_config("k4v4-rope", quant_start=0)
    c = tq_mlx.TurboQuantKVCache(cfg, rope=probe(nn.RoPE(D), D))
    k = mx.random.normal((1, H, T, D), key=mx.random.key(1)).astype(mx.float16)
    os.environ["TQ_MLX_ATTENTION"] = "metal"
    try:
        with emulated(check_races=False):
            c.update_and_fetch(k, k)
            mx.eval(attention(c, mx.random.normal((1, 4 * H, T, D)).astype(mx.float16), D**-0.5, "causal"))
            for _ in range(4 if new_block else 3):  # positions 300 ..: the traced step is 304 (a new block) or 303
                c.update_and_fetch(k[:, :, :1], k[:, :, :1])
                mx.eval(attention(c, mx.random.normal((1, 4 * H, 1, D)).astype(mx.float16), D**-0.5))
    finally:
        os.environ.pop("TQ_MLX_ATTENTION")
    assert c.k_codec.kernel_encode and c.offset == (304 if new_block else 303)
    launches, _ = trace_step(c, *_step_inputs(H, D), D**-0.5, "metal")
    assert launches["CustomKernel"] == 5  # tq_encode for K and V, tq_rope_bias, tq_decode, tq_merge
    extra = sum(launches.values()) - fp_cache_launches(c.size())
    assert extra <= LAUNCH_BUDGET, launches
