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


def single(config, T, seed, **overrides):
    cfg = tq_mlx.resolve_config(config, quant_start=16, fp_window=4, **overrides)
    c = TurboQuantKVCache(cfg)
    c.update_and_fetch(rand((1, H, T, D), seed), rand((1, H, T, D), seed + 1))
    attention(c, rand((1, G * H, T, D), seed + 2), D**-0.5, "causal")
    return c


def ragged(config, **overrides):
    """Rows of 9 (exact), 18 (window filling), 70 and 41 tokens, after one batched decode step."""
    batch = TurboQuantKVCache.merge(
        [single(config, T, seed, **overrides) for T, seed in ((9, 1), (18, 2), (70, 3), (41, 4))]
    )
    batch.update_and_fetch(rand((4, H, 1, D), 5), rand((4, H, 1, D), 6))
    return batch


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


def test_ragged_rows_with_attention_sinks_on_the_kernels(monkeypatch):
    batch = ragged("k4v4")
    got, ref = on_kernels(batch, rand((4, G * H, 1, D), 8), rand((G * H,), 9), monkeypatch)
    np.testing.assert_allclose(got, ref, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_a_batched_decode_step_encodes_on_the_kernel_with_each_rows_codecs(monkeypatch):
    """tq_encode with per-row constants stores the codes the reference encoder gives each row."""
    ref = ragged("k4v4")
    monkeypatch.setenv("TQ_MLX_ATTENTION", "metal")
    with emulated():
        got = ragged("k4v4")
        mx.eval(got.state)
    codes_ref, codes_got = ref.stores["codes"], got.stores["codes"]
    assert codes_got.lengths == codes_ref.lengths
    for b, n in enumerate(codes_ref.lengths):
        for name, a in codes_ref.buffers.items():
            assert mx.array_equal(a[b, :, :n], codes_got.buffers[name][b, :, :n]).item(), (b, name)
