"""The life of a token in a TurboQuantKVCache: exact phase, calibration on the first quant_start tokens,
compressed phase; stores that grow rarely and sliding windows written in place."""

import copy

import mlx.core as mx
import numpy as np
import pytest

import tq_mlx
from tq_mlx import TurboQuantKVCache
from tq_mlx.packing import unpack
from tq_mlx.patch import tq_scaled_dot_product_attention as sdpa
from tq_mlx.store import STEP, TokenStore


def _kv(h, t, d, seed=0):
    k1, k2 = mx.random.split(mx.random.key(seed))
    return mx.random.normal((1, h, t, d), key=k1), mx.random.normal((1, h, t, d), key=k2)


def _feed(cache, k, v, sizes, gqa=3, seed=0):
    """Feed k/v in chunks of `sizes`, with an attention call after each (the same query per position
    whatever the chunking)."""
    B, H, T, d = k.shape
    queries = mx.random.normal((B, H * gqa, T, d), key=mx.random.key(seed))
    pos = 0
    for n in sizes:
        cache.update_and_fetch(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        sdpa(queries[:, :, pos : pos + n], None, None, cache, 0.125, "causal" if n > 1 else None)
        pos += n


def test_short_contexts_are_attended_exactly_as_given():
    cache = TurboQuantKVCache(tq_mlx.resolve_config("k3v3", quant_start=64))
    k, v = _kv(2, 40, 64)
    _feed(cache, k, v, [30, 1, 1])
    assert not cache.calibrated and cache.k_codec is None
    q = mx.random.normal((1, 6, 1, 64))
    cache.update_and_fetch(k[:, :, 32:33], v[:, :, 32:33])
    want = mx.fast.scaled_dot_product_attention(q, k[:, :, :33], v[:, :, :33], scale=0.125)
    assert mx.array_equal(sdpa(q, None, None, cache, 0.125, None), want)


def test_the_cache_compresses_once_it_holds_quant_start_tokens():
    cache = TurboQuantKVCache(tq_mlx.resolve_config("k4v4", quant_start=64, fp_window=8))
    k, v = _kv(2, 70, 64)
    _feed(cache, k, v, [60, 1, 1, 1])
    assert not cache.calibrated
    _feed_from = 63
    cache.update_and_fetch(k[:, :, _feed_from : _feed_from + 1], v[:, :, _feed_from : _feed_from + 1])
    sdpa(mx.zeros((1, 6, 1, 64)), None, None, cache, 0.125, None)
    assert cache.calibration_length == 64
    assert (cache.sink.length, cache.codes.length, cache.window.length) == (1, 64 - 1 - 8, 8)
    assert cache.exact.length == 0


def test_codecs_depend_on_the_first_quant_start_tokens_only():
    """Any chunking of the same tokens gives the same codecs and codes (a server's prefix cache is exact)."""
    k, v = _kv(2, 100, 64, seed=3)
    caches = []
    for sizes in ([100], [13, 50, 1, 1, 35], [64, 36]):
        c = TurboQuantKVCache(tq_mlx.resolve_config("k4v4", quant_start=64))
        _feed(c, k, v, sizes, seed=1000)  # the same query per position whatever the chunking
        caches.append(c)
    ref = caches[0]
    for c in caches[1:]:
        for name, a in ref.k_codec.calibration_state().items():
            np.testing.assert_allclose(np.array(c.k_codec.calibration_state()[name]), np.array(a), rtol=1e-5, atol=1e-6)
        a = np.array(unpack(c.codes.view()["k_codes0"], 4, 64))
        b = np.array(unpack(ref.codes.view()["k_codes0"], 4, 64))
        assert (a != b).mean() < 1e-3


def test_queries_beyond_the_calibration_positions_do_not_count():
    k, v = _kv(1, 80, 64, seed=4)
    a = TurboQuantKVCache(tq_mlx.resolve_config("k4v4", quant_start=32))
    b = TurboQuantKVCache(tq_mlx.resolve_config("k4v4", quant_start=32))
    a.update_and_fetch(k[:, :, :40], v[:, :, :40])
    b.update_and_fetch(k[:, :, :40], v[:, :, :40])
    q = mx.random.normal((1, 3, 40, 64))
    q2 = mx.concatenate([q[:, :, :32], 10 * q[:, :, 32:]], axis=2)  # differs only after position 32
    sdpa(q, None, None, a, 0.125, "causal")
    sdpa(q2, None, None, b, 0.125, "causal")
    assert mx.allclose(a.k_codec.weight, b.k_codec.weight)


def test_a_state_saved_in_the_exact_phase_resumes_identically():
    cfg = tq_mlx.resolve_config("k4v4", quant_start=48)
    k, v = _kv(2, 60, 64, seed=5)
    a = TurboQuantKVCache(cfg)
    _feed(a, k, v, [30], seed=7)
    b = TurboQuantKVCache.from_state(a.state)
    assert b.qstats is not None and b.qstats.n == a.qstats.n
    for c in (a, b):
        _feed(c, k[:, :, 30:], v[:, :, 30:], [30], seed=37)
    assert mx.array_equal(a.k_codec.weight, b.k_codec.weight)
    assert mx.array_equal(a.codes.view()["k_codes0"], b.codes.view()["k_codes0"])


def test_store_capacity_grows_by_a_sixteenth_beyond_the_step():
    st = TokenStore()
    caps = []
    for _ in range(3000):
        st.append({"x": mx.zeros((1, 1, 1, 4), mx.uint32)})
        if not caps or caps[-1] != st.capacity:
            caps.append(st.capacity)
    assert caps[:3] == [STEP, 2 * STEP, 3 * STEP]
    assert all(b - a == max(STEP, -(-(a // 16) // STEP) * STEP) for a, b in zip(caps, caps[1:]))
    assert caps[-1] - 3000 < caps[-1] / 16 + STEP  # slack stays small


def test_one_append_allocates_exactly_rounded_to_the_step():
    st = TokenStore()
    st.append({"x": mx.zeros((1, 2, 130, 8))})
    assert st.capacity == 192


def test_a_full_sliding_window_is_written_in_place():
    cache = TurboQuantKVCache(tq_mlx.resolve_config("k4v4", quant_start=0, fp_window=4), max_size=32, keep=2)
    k, v = _kv(1, 200, 64, seed=6)
    _feed(cache, k, v, [32] + [1] * 40, gqa=1)
    shapes = {n: b.shape for n, b in cache.codes.buffers.items()}
    starts = []
    for i in range(72, 100):
        cache.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        sdpa(mx.zeros((1, 1, 1, 64)), None, None, cache, 0.125, None)
        starts.append(cache.codes.start)
        assert {n: b.shape for n, b in cache.codes.buffers.items()} == shapes  # no reallocation
    assert cache.size() == 32 and cache.codes.length == 32 - 4 and cache.window.length == 4
    assert len(set(starts)) > 20  # the ring turns


def test_a_wrapped_ring_round_trips_through_state_and_deepcopy():
    cache = TurboQuantKVCache(tq_mlx.resolve_config("k4v4", quant_start=0), max_size=16)
    k, v = _kv(1, 60, 64, seed=8)
    _feed(cache, k, v, [10] + [1] * 30, gqa=1)
    assert cache.codes.start != 0
    q = mx.random.normal((1, 1, 1, 64))
    want = sdpa(q, None, None, cache, 0.125, None)
    twin = copy.deepcopy(cache)
    clone = TurboQuantKVCache.from_state(cache.state)
    np.testing.assert_allclose(np.array(sdpa(q, None, None, clone, 0.125, None)), np.array(want), atol=1e-6)
    np.testing.assert_allclose(np.array(sdpa(q, None, None, twin, 0.125, None)), np.array(want), atol=1e-6)


@pytest.mark.parametrize("max_size,fp_window", [(8, 16), (6, 0)])
def test_tiny_sliding_windows_keep_a_sensible_window(max_size, fp_window):
    cache = TurboQuantKVCache(
        tq_mlx.resolve_config("k4v4", quant_start=0, fp_window=fp_window), max_size=max_size, keep=2
    )
    k, v = _kv(1, 40, 64, seed=9)
    _feed(cache, k, v, [5] + [1] * 30, gqa=1)
    assert cache.size() == max_size and cache.window_size < max_size - 2


@pytest.mark.parametrize("weighting", [True, "full"])
def test_a_cache_trimmed_before_calibration_calibrates_as_if_it_never_saw_the_trimmed_tokens(weighting):
    """A server's prefix cache: a cached chat (prompt and answer) trimmed back to the shared prefix, then a
    new prompt, gives the same codecs and codes as a cold cache fed the prefix and the new prompt."""
    cfg = tq_mlx.resolve_config("k4v4", quant_start=64, keys=tq_mlx.CodecSpec(bits=4, query_weighting=weighting))
    k, v = _kv(2, 70, 64, seed=5)
    other_k, other_v = _kv(2, 20, 64, seed=6)
    q, other_q = (mx.random.normal((1, 6, n, 64), key=mx.random.key(s)) for n, s in ((70, 7), (20, 8)))
    warm, cold = TurboQuantKVCache(cfg), TurboQuantKVCache(cfg)

    def step(c, k, v, q):
        c.update_and_fetch(k, v)
        sdpa(q, None, None, c, 0.125, "causal")

    step(warm, k[:, :, :30], v[:, :, :30], q[:, :, :30])
    step(warm, other_k, other_v, other_q)  # the cached chat's other tokens
    assert warm.trim(20) == 20 and not warm.calibrated
    step(cold, k[:, :, :30], v[:, :, :30], q[:, :, :30])
    for c in (warm, cold):
        step(c, k[:, :, 30:], v[:, :, 30:], q[:, :, 30:])
    assert warm.calibrated and cold.calibrated
    assert mx.array_equal(warm.k_codec.weight, cold.k_codec.weight)
    assert mx.array_equal(warm.codes.view()["k_codes0"], cold.codes.view()["k_codes0"])


def test_the_call_that_completes_quant_start_answers_its_earlier_queries_exactly():
    """A prompt of exactly quant_start tokens is attended as mlx-lm's fp cache would, in one call or two."""
    cfg = tq_mlx.resolve_config("k4v4", quant_start=64)
    k, v = _kv(2, 64, 64, seed=11)
    q = mx.random.normal((1, 6, 64, 64), key=mx.random.key(12))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    cache = TurboQuantKVCache(cfg)
    cache.update_and_fetch(k, v)
    got = sdpa(q, None, None, cache, 0.125, "causal")
    assert cache.calibrated and mx.array_equal(got, want)


def test_prefill_output_does_not_depend_on_the_chunks_around_quant_start():
    """Queries before quant_start are answered on the exact tokens and later ones on the codes, whatever the
    chunking (a calibrating call used to answer all its queries on the codes)."""
    cfg = tq_mlx.resolve_config("k4v4", quant_start=64)
    k, v = _kv(2, 100, 64, seed=13)
    q = mx.random.normal((1, 6, 100, 64), key=mx.random.key(14))
    outs = []
    for sizes in ([100], [20, 80], [63, 1, 36]):
        cache, pos, out = TurboQuantKVCache(cfg), 0, []
        for n in sizes:
            cache.update_and_fetch(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
            out.append(sdpa(q[:, :, pos : pos + n], None, None, cache, 0.125, "causal" if n > 1 else None))
            pos += n
        outs.append(mx.concatenate(out, axis=2))
    for o in outs[1:]:
        assert mx.allclose(o, outs[0], atol=1e-5)
