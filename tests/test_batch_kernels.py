"""Batched decode on the Metal kernels (CPU emulator): ragged rows, each with its own counts and codecs.

A batch's rows differ in everything a decode step reads: coded, sink, window and exact token counts, and
the codec constants each row calibrated on its own tokens.  tq_decode/tq_merge take them per row and must
give the batch reference path's result (which tests/test_batch_cache.py checks against single caches)."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from emu import emulated

import tq_mlx
from tq_mlx import CacheConfig, CodecSpec, TurboQuantKVCache
from tq_mlx import kernels as K
from tq_mlx.attention import attention
from tq_mlx.batch_attention import batch_attention, reference_decode

pytestmark = pytest.mark.emu
H, D, G = 2, 64, 3


def rand(shape, seed):
    return mx.random.normal(shape, key=mx.random.key(seed))


def single(config, T, seed, rope=None, max_size=None, **overrides):
    cfg = tq_mlx.resolve_config(config, quant_start=16, fp_window=4, **overrides)
    c = TurboQuantKVCache(cfg, rope=rope, max_size=max_size)
    c.update_and_fetch(rand((1, H, T, D), seed), rand((1, H, T, D), seed + 1))
    attention(c, rand((1, G * H, T, D), seed + 2), D**-0.5, "causal")
    return c


def ragged(config, lengths=(9, 18, 70, 41), steps=1, **overrides):
    """Rows of 9 (exact), 18 (window filling), 70 and 41 tokens, after `steps` batched decode steps."""
    batch = TurboQuantKVCache.merge([single(config, T, seed, **overrides) for seed, T in enumerate(lengths, 1)])
    for i in range(steps):
        batch.update_and_fetch(rand((4, H, 1, D), 5 + 2 * i), rand((4, H, 1, D), 6 + 2 * i))
    return batch


def rope_map():
    import mlx.nn as nn

    from tq_mlx.rope_mean import probe

    return probe(nn.RoPE(D, base=10000.0), D)


def on_kernels(batch, q, sinks, monkeypatch):
    """(kernel path, reference path) of one batched decode step, float32 numpy; the kernel must have run."""
    ref = reference_decode(copy.deepcopy(batch), q, D**-0.5, sinks)
    calls = []
    decode = K.decode_partials
    monkeypatch.setattr(K, "decode_partials", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    monkeypatch.setenv("TQ_MLX_ATTENTION", "metal")
    with emulated():
        got = batch_attention(batch, q, D**-0.5, None, sinks, *batch.handed)
        mx.eval(got)
    assert calls == [1]
    return np.array(got), np.array(ref)


FULL = CacheConfig(keys=CodecSpec(bits=4, query_weighting="full"), values=CodecSpec(bits=3))  # dense maps per row


@pytest.mark.parametrize("config", ["k4v3", FULL])
def test_ragged_rows_decode_on_the_kernels_as_on_the_reference_path(config, monkeypatch):
    batch = ragged(config)
    assert len(set(batch.stores["codes"].lengths)) == 4  # every row its own count (0 for the exact row)
    got, ref = on_kernels(batch, rand((4, G * H, 1, D), 7), None, monkeypatch)
    np.testing.assert_allclose(got, ref, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_rope_centred_rows_decode_on_the_kernels_with_their_own_means_and_positions(monkeypatch):
    """Rows at positions 9 .. 330, each with its own pre-RoPE mean: tq_rope_bias's blocks span them all."""
    batch = ragged("k4v4-rope", lengths=(9, 18, 330, 41), rope=rope_map())
    assert batch.codecs()[0].rope_mean.shape == (4, H, D)
    got, ref = on_kernels(batch, rand((4, G * H, 1, D), 7), None, monkeypatch)
    np.testing.assert_allclose(got, ref, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_rope_centred_sliding_window_rows_decode_on_the_kernels(monkeypatch):
    """Rings of 24 slots wrapped to other depths: each slot's position read from the ring."""
    batch = ragged("k4v4-rope", lengths=(30, 50, 300, 41), rope=rope_map(), max_size=24)
    got, ref = on_kernels(batch, rand((4, G * H, 1, D), 7), None, monkeypatch)
    np.testing.assert_allclose(got, ref, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_ragged_rows_with_attention_sinks_on_the_kernels(monkeypatch):
    batch = ragged("k4v4")
    got, ref = on_kernels(batch, rand((4, G * H, 1, D), 8), rand((G * H,), 9), monkeypatch)
    np.testing.assert_allclose(got, ref, atol=2e-5 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("rope", [False, True])
def test_a_batched_decode_step_encodes_on_the_kernel_with_each_rows_codecs(rope, monkeypatch):
    """tq_encode with per-row constants (RoPE-centred keys: each row's mean turned to its position) stores the
    codes the reference encoder gives each row."""
    kw = dict(rope=rope_map()) if rope else {}
    ref = ragged("k4v4-rope" if rope else "k4v4", **kw)
    monkeypatch.setenv("TQ_MLX_ATTENTION", "metal")
    with emulated():
        got = ragged("k4v4-rope" if rope else "k4v4", **kw)
        mx.eval(got.state)
    codes_ref, codes_got = ref.stores["codes"], got.stores["codes"]
    assert codes_got.lengths == codes_ref.lengths
    for b, n in enumerate(codes_ref.lengths):
        for name, a in codes_ref.buffers.items():
            assert mx.array_equal(a[b, :, :n], codes_got.buffers[name][b, :, :n]).item(), (b, name)
