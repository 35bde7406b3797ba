"""TurboQuantKVCache on synthetic K/V: the mlx-lm cache protocol and the reference attention."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

import tq_mlx
from tq_mlx import CacheStateError, TurboQuantKVCache, describe
from tq_mlx.patch import tq_scaled_dot_product_attention as sdpa


def _tq(preset, **kw):
    """A TurboQuantKVCache that compresses from the first attention call (these tests look at the codes)."""
    max_size, keep = kw.pop("max_size", None), kw.pop("keep", 0)
    return TurboQuantKVCache(tq_mlx.resolve_config(preset, quant_start=0, **kw), max_size=max_size, keep=keep)


def _kv(h, t, d, seed=0, dv=None):
    k1, k2 = mx.random.split(mx.random.key(seed))
    return mx.random.normal((1, h, t, d), key=k1), mx.random.normal((1, h, t, dv or d), key=k2)


def _fill(cache, k, v, chunks=(0.6,)):
    """Feed k/v in chunks, running attention after each so the cache behaves as inside a model."""
    t = k.shape[2]
    cuts = [0] + [int(c * t) for c in chunks] + [t]
    for a, b in zip(cuts[:-1], cuts[1:]):
        cache.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
        q = mx.zeros((1, k.shape[1], b - a, k.shape[3]))
        sdpa(q, None, None, cache, 1.0, "causal" if b - a > 1 else None)


def _dequantized(cache):
    """Every stored token decoded to the original domain: (B, H, T, dk), (B, H, T, dv)."""
    ks = [b.k_codec.decode(b.k) for b in cache.blocks()]
    vs = [b.v_codec.decode(b.v) for b in cache.blocks()]
    return mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("gqa", [1, 3, 7])
def test_decode_matches_dequantize_then_sdpa(d, gqa):
    h, t = 2, 37
    cache = _tq("k4v3")
    k, v = _kv(h, t, d)
    _fill(cache, k, v)
    q = mx.random.normal((1, h * gqa, 1, d), key=mx.random.key(5))
    kd, vd = _dequantized(cache)
    want = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=d**-0.5, mask=None)
    got = sdpa(q, None, None, cache, d**-0.5, None)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["k8v4", "2.5", "k4v4-qjl", "k4v3-fast", "fp16"])
def test_prefill_chunk_with_causal_mask_matches_dequantized(preset):
    d, h, g = 64, 3, 3
    cache = _tq(preset)
    k, v = _kv(h, 45, d)
    _fill(cache, k[:, :, :29], v[:, :, :29])
    cache.update_and_fetch(k[:, :, 29:], v[:, :, 29:])  # a 16-token chunk after 29 stored tokens
    q = mx.random.normal((1, h * g, 16, d), key=mx.random.key(3))
    got = sdpa(q, None, None, cache, 0.125, "causal")
    kd, vd = _dequantized(cache)
    want = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask=mx.tril(mx.ones((16, 45)), k=29) > 0)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-4)


def test_high_bits_close_to_exact_attention():
    d, h = 128, 2
    cache = _tq("k8v8")
    k, v = _kv(h, 100, d)
    _fill(cache, k, v)
    q = mx.random.normal((1, h * 4, 1, d))
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5)
    got = sdpa(q, None, None, cache, d**-0.5, None)
    assert float(mx.abs(got - exact).max()) < 0.02


def test_attention_sinks_join_the_softmax():
    d, h = 64, 2
    cache = _tq("fp16")
    k, v = _kv(h, 20, d)
    _fill(cache, k, v)
    q = mx.random.normal((1, 4, 1, d))
    sinks = mx.array([0.5, -1.0, 2.0, 0.0])
    want = mx.fast.scaled_dot_product_attention(
        q,
        k.astype(mx.float16).astype(mx.float32),
        v.astype(mx.float16).astype(mx.float32),
        scale=0.125,
        mask=None,
        sinks=sinks,
    )
    got = sdpa(q, None, None, cache, 0.125, None, sinks=sinks)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)


def test_sliding_window_fp16_matches_mlx_rotating_cache():
    d, h, window = 64, 1, 16
    ours, theirs = _tq("fp16", max_size=window, keep=0), RotatingKVCache(window)
    k, v = _kv(h, 40, d)
    k, v = k.astype(mx.float16).astype(mx.float32), v.astype(mx.float16).astype(mx.float32)
    pos = 0
    for n in (10, 12, 1, 1, 9, 1, 1, 1, 4):
        q = mx.random.normal((1, 2, n, d), key=mx.random.key(pos))
        mask_t = theirs.make_mask(n, window_size=window)
        mask_o = ours.make_mask(n, window_size=window)
        kk, vv = theirs.update_and_fetch(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        ours.update_and_fetch(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        want = mx.fast.scaled_dot_product_attention(q, kk, vv, scale=0.125, mask=mask_t)
        got = sdpa(q, None, None, ours, 0.125, mask_o)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, err_msg=f"at pos {pos}")
        pos += n
    assert ours.size() == theirs.size() and ours.offset == theirs.offset


def test_trim_forgets_the_newest_tokens():
    cache = _tq("k4v4")
    k, v = _kv(2, 30, 64)
    _fill(cache, k, v)
    assert cache.is_trimmable() and cache.trim(7) == 7
    assert cache.offset == 23 and cache.size() == 23
    fresh = _tq("k4v4")
    _fill(fresh, k[:, :, :23], v[:, :, :23], chunks=(18 / 23,))  # same first chunk of 18 tokens
    q = mx.random.normal((1, 2, 1, 64))
    np.testing.assert_array_equal(
        np.array(sdpa(q, None, None, cache, 0.1, None)), np.array(sdpa(q, None, None, fresh, 0.1, None))
    )


def test_state_round_trip_restores_identical_attention():
    cache = _tq("2.5")
    k, v = _kv(2, 40, 128)
    _fill(cache, k, v)
    clone = TurboQuantKVCache.from_state(cache.state)
    q = mx.random.normal((1, 4, 1, 128))
    np.testing.assert_array_equal(
        np.array(sdpa(q, None, None, cache, 0.1, None)), np.array(sdpa(q, None, None, clone, 0.1, None))
    )
    assert clone.offset == cache.offset and clone.config == cache.config


def test_deepcopy_is_independent():
    cache = _tq("k4v4")
    k, v = _kv(1, 20, 64)
    _fill(cache, k, v)
    twin = copy.deepcopy(cache)
    more_k, more_v = _kv(1, 1, 64, seed=9)
    cache.update_and_fetch(more_k, more_v)
    assert twin.offset == 20 and cache.offset == 21 and twin.size() == 20


def test_nbytes_counts_codes_not_fp():
    d, h, t = 128, 4, 1024
    cache = _tq("k4v4", fp_sink=0)
    k, v = _kv(h, t, d)
    _fill(cache, k, v)
    fp16_bytes = 2 * h * t * d * 2
    stored = sum(a.nbytes for a in cache.codes.view().values())
    assert stored == 2 * h * t * (d * 4 // 8 + 2)  # 4-bit codes + an fp16 norm per vector, K and V
    side = cache.k_codec.side_nbytes + cache.v_codec.side_nbytes
    assert cache.window.nbytes == 0 and cache.nbytes == cache.codes.nbytes + side  # capacity included
    assert fp16_bytes / cache.nbytes > 3.5


def test_a_sliding_layer_right_after_a_chunk_counts_every_token_it_holds():
    d, h, w = 128, 4, 1024
    cache = _tq("k4v4", max_size=w)
    k, v = _kv(h, 2 * w, d)
    _fill(cache, k, v, chunks=(0.25, 0.5, 0.75))  # chunks of 512: the last one is held whole with the window
    assert cache.size() == w and cache.held() == w + 512 - 1  # as mlx-lm's RotatingKVCache holds them
    assert describe.fp16_bytes(cache) == 2 * h * cache.held() * d * 2
    assert describe.fp16_bytes(cache) / cache.nbytes > 3.5


def test_no_bits_attribute_routes_mlx_lm_to_affine_path():
    assert not hasattr(_tq("k4v4"), "bits")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="k4v4.*hqmq-s96r4"):
        _tq("k5v9x")


def test_unsupported_head_dim_is_a_clear_error():
    cache = _tq("k4v4")
    k, v = _kv(1, 4, 8)
    with pytest.raises(ValueError, match="layer 0: keys of size 8 cannot be coded.*16..1024.*fp16"):
        _fill(cache, k, v)


def test_nan_keys_are_rejected_and_nothing_is_stored():
    cache = _tq("k4v4")
    k, v = _kv(1, 4, 64)
    k[0, 0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        cache.update_and_fetch(k, v)
    assert cache.empty() and cache.offset == 0


def test_corrupt_state_is_a_clear_error():
    cache = _tq("k4v4")
    k, v = _kv(1, 10, 64)
    _fill(cache, k, v)
    st = cache.state
    st["codes_k_codes0"] = st["codes_k_codes0"][:, :, :3]
    with pytest.raises(CacheStateError, match="corrupt"):
        TurboQuantKVCache.from_state(st)
    with pytest.raises(CacheStateError, match="tq_meta"):
        TurboQuantKVCache.from_state({"keys": mx.zeros(3)})


def test_a_model_that_attends_by_itself_gets_the_whole_cache():
    """A hand-written attention (gemma2's softcapping) reads what update_and_fetch returns: the whole cache."""
    cache = _tq("k8v8")
    k, v = _kv(1, 12, 64)
    kk, vv = cache.update_and_fetch(k[:, :, :8], v[:, :, :8])
    assert mx.array_equal(kk, k[:, :, :8])  # the exact tokens
    kk, vv = cache.update_and_fetch(k[:, :, 8:], v[:, :, 8:])  # no attention in between: it attends by itself
    assert cache.calibrated and kk.shape == (1, 1, 12, 64) and float(mx.abs(kk - k).max()) < 0.05  # codes
    sdpa(mx.zeros((1, 1, 1, 64)), kk, mx.zeros_like(vv), cache, 0.1, None)  # attention on arrays it made: as given
    kk, vv = cache.update_and_fetch(k[:, :, :1], v[:, :, :1])  # still the whole cache
    assert kk.shape == (1, 1, 13, 64) and float(mx.abs(kk[:, :, :12] - k).max()) < 0.05


def test_after_attention_reads_the_cache_updates_hand_back_placeholders():
    cache = _tq("k4v4")
    k, v = _kv(1, 20, 64)
    kk, vv = cache.update_and_fetch(k[:, :, :10], v[:, :, :10])
    sdpa(mx.zeros((1, 2, 10, 64)), kk, vv, cache, 0.1, "causal")  # the handed arrays: read from the cache
    kk, vv = cache.update_and_fetch(k[:, :, 10:11], v[:, :, 10:11])
    assert kk.shape == (1, 1, 1, 64) and mx.array_equal(kk, k[:, :, 10:11])


def test_a_model_that_changes_attention_path_is_refused():
    cache = _tq("k4v4")
    k, v = _kv(1, 4, 64)
    kk, vv = cache.update_and_fetch(k, v)
    sdpa(mx.zeros((1, 2, 4, 64)), kk, vv, cache, 0.1, "causal")
    cache.update_and_fetch(k[:, :, :1], v[:, :, :1])  # then no attention call: it read the placeholders
    with pytest.raises(RuntimeError, match="mixes attention paths"):
        cache.update_and_fetch(k[:, :, :1], v[:, :, :1])


def test_keys_and_values_give_the_whole_cache_after_placeholders():
    """afm7's KV-reuse layers read keys_and_values() and take the context length from its shape."""
    cache = _tq("k8v8")
    k, v = _kv(1, 12, 64)
    _fill(cache, k, v)
    kk, vv = cache.keys_and_values()
    assert kk.shape == (1, 1, 12, 64) and float(mx.abs(kk - k).max()) < 0.05 and float(mx.abs(vv - v).max()) < 0.05


def test_attention_on_arrays_another_cache_handed_out_reads_that_cache():
    """iquestloopcoder's second loop attends to the first loop's K/V but passes its own (empty) cache."""
    owner, other = _tq("k8v8"), _tq("k8v8")
    k, v = _kv(1, 12, 64)
    _fill(owner, k, v)
    kk, vv = owner.keys_and_values()
    q = mx.random.normal((1, 2, 1, 64), key=mx.random.key(3))
    got = sdpa(q, kk, vv, other, 0.125, None)
    want = mx.fast.scaled_dot_product_attention(q, kk, vv, scale=0.125)  # the decoded codes, as given
    assert other.empty() and mx.allclose(got, want, atol=1e-4)


def test_setting_keys_attaches_a_dependency_to_the_stored_codes():
    """mlx-lm's `cache.keys = mx.depends(cache.keys, x)`: evaluating the cache evaluates x."""
    cache = _tq("k4v4")
    k, v = _kv(1, 8, 64)
    _fill(cache, k, v)
    before = {n: mx.array(b) for n, b in cache.codes.buffers.items()}
    cache.keys = mx.depends(cache.keys, mx.ones(3))
    cache.values = mx.zeros_like(cache.values)
    assert all(mx.array_equal(before[n], b) for n, b in cache.codes.buffers.items())  # the codes unchanged
    with pytest.raises(NotImplementedError, match="attaching a dependency"):
        cache.keys = mx.zeros((1, 1, 3, 64))


def test_chunked_cache_keeps_the_newest_chunk_size_tokens():
    """mlx-lm's ChunkedKVCache (llama4): maybe_trim_front before each update, start_position counts the rest."""
    cache = TurboQuantKVCache(tq_mlx.resolve_config("k8v8", quant_start=0), chunk_size=8)
    k, v = _kv(1, 14, 64)
    _fill(cache, k[:, :, :10], v[:, :, :10])
    cache.maybe_trim_front()
    assert cache.start_position == 2 and cache.size() == 8 and cache.offset == 10
    cache.update_and_fetch(k[:, :, 10:14], v[:, :, 10:14])
    kk, _ = cache.keys_and_values()
    assert kk.shape[2] == 12 and float(mx.abs(kk - k[:, :, 2:]).max()) < 0.05
    restored = TurboQuantKVCache.from_state(cache.state)
    assert (restored.chunk_size, restored.start_position) == (8, 2)


def test_a_keys_only_cache_stores_empty_values():
    """MiniMax-M3's indexer caches keys with values of size 0."""
    cache = _tq("k4v4")
    k, _ = _kv(1, 6, 64)
    kk, vv = cache.update_and_fetch(k, mx.zeros((1, 1, 6, 0)))
    cache.update_and_fetch(k[:, :, :1], mx.zeros((1, 1, 1, 0)))
    kk, vv = cache.keys_and_values()
    assert kk.shape == (1, 1, 7, 64) and vv.shape == (1, 1, 7, 0) and cache.calibrated


def test_describe_cache_names_each_layer_and_what_is_kept():
    from tq_mlx.describe import summary

    cache = [KVCache(), _tq("k4v4"), TurboQuantKVCache("k4v4", max_size=16, keep=4)]
    lines = tq_mlx.describe_cache(cache)
    assert lines[0] == "layer 0: full attention (mlx-lm's KVCache)"
    assert lines[1].startswith("layer 1: full attention, TurboQuant k4v4+quant_start=0")
    assert "sliding window 16" in lines[2]
    assert summary(cache) == "2 of 3 layers compressed; kept: 1 x full attention (mlx-lm's KVCache)"


def test_mlx_lm_affine_cache_still_uses_the_original_path():
    c = KVCache()
    k, v = _kv(1, 5, 64)
    kk, vv = c.update_and_fetch(k, v)
    q = mx.random.normal((1, 2, 1, 64))
    want = mx.fast.scaled_dot_product_attention(q, kk, vv, scale=0.125)
    np.testing.assert_array_equal(np.array(sdpa(q, kk, vv, c, 0.125, None)), np.array(want))


def test_full_query_whitening_keeps_attention_exact():
    cfg = tq_mlx.CacheConfig(keys=tq_mlx.CodecSpec(bits=4, query_weighting="full"), values=tq_mlx.CodecSpec(bits=4))
    cache = TurboQuantKVCache(tq_mlx.resolve_config(cfg, quant_start=0))
    k, v = _kv(2, 50, 64)
    cache.update_and_fetch(k, v)
    q = mx.random.normal((1, 6, 50, 64), key=mx.random.key(1))
    got = sdpa(q, None, None, cache, 0.125, "causal")  # the first attention call learns the whitening
    assert cache.k_codec.weight.shape == (2, 64, 64)
    kd, vd = _dequantized(cache)
    want = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask="causal")
    np.testing.assert_allclose(np.array(got), np.array(want), atol=5e-5, rtol=1e-4)


def test_uniform_grid_needs_sizes_divisible_by_32():
    cache = _tq("k4v4-fast")
    k, v = _kv(1, 4, 80)
    with pytest.raises(ValueError, match="size 80 cannot be coded.*multiple of 32"):
        _fill(cache, k, v)


def test_uniform_grid_stores_mlx_affine_codes():
    cache = _tq("k4v4-fast", fp_sink=0)
    k, v = _kv(2, 64, 128)
    _fill(cache, k, v)
    view = cache.codes.view()
    assert view["k_codes0"].shape == (1, 2, 64, 128 * 4 // 32) and view["k_scales0"].dtype == mx.float16


def test_keys_of_another_size_than_the_models_layer_are_refused():
    cache = TurboQuantKVCache("k4v4", kv_heads=2, head_dims=(64, 64))
    k, v = _kv(2, 4, 128)
    with pytest.raises(ValueError, match="2 KV heads of sizes.*another model"):
        cache.update_and_fetch(k, v)
    assert cache.empty() and cache.offset == 0


def _tiny_llama(hidden, heads, kv_heads, seed=0):
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=50,
        tie_word_embeddings=True,
    )
    return llama.Model(args)


def test_a_cache_made_for_one_model_refuses_another():
    a, b = _tiny_llama(64, 4, 2), _tiny_llama(128, 4, 2)  # head_dim 16 vs 32
    cache = tq_mlx.make_prompt_cache(a, "fp16")
    a(mx.array([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="another model"):
        b(mx.array([[4]]), cache=cache)


def test_a_corrupt_cache_file_is_reported_at_load(tmp_path):
    from mlx_lm.models.cache import save_prompt_cache

    cache = _tq("k4v4")
    k, v = _kv(1, 10, 64)
    _fill(cache, k, v)
    path = str(tmp_path / "c.safetensors")
    save_prompt_cache(path, [cache])
    arrays, meta = mx.load(path, return_metadata=True)
    name = next(n for n in arrays if n.endswith("codes_k_norm0"))
    arrays[name] = mx.full(arrays[name].shape, float("nan"), arrays[name].dtype)
    mx.save_safetensors(path, arrays, meta)
    with pytest.raises(CacheStateError, match="corrupt cache file.*codes.*k_norm0"):
        tq_mlx.load_prompt_cache(path)
