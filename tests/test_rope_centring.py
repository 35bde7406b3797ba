"""RoPE-aware key centring (center="rope", the -rope presets): the keys' mean taken before the rotary
embedding and turned back to each key's position."""

import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.rope_utils import initialize_rope

import tq_mlx
from tq_mlx import TurboQuantKVCache
from tq_mlx.patch import tq_scaled_dot_product_attention as sdpa
from tq_mlx.rope_mean import AtPositions, centres, fit_mean, probe, rotate, rotate_at

D = 64
ROPES = {
    "half pairs": nn.RoPE(D, base=10000.0),
    "traditional": nn.RoPE(D, traditional=True, base=10000.0),
    "partial dims": nn.RoPE(D // 2, base=10000.0),
    "llama3": initialize_rope(
        D,
        500000.0,
        False,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        131072,
    ),
}


@pytest.mark.parametrize("name", list(ROPES))
def test_a_probed_map_turns_vectors_as_the_model_rope_does(name):
    rope = ROPES[name]
    rmap = probe(rope, D)
    assert rmap is not None
    mu = mx.random.normal((2, D), key=mx.random.key(1))
    for start, n in ((0, 5), (777, 3), (20000, 2)):  # float32 angles: agreement to 1e-3 up to ~2e4
        want = rope(mx.broadcast_to(mu[None, :, None], (1, 2, n, D)), offset=start)
        assert mx.allclose(rotate(rmap, mu, start, n), want, atol=2e-3)


def test_a_module_that_is_not_a_rotation_gives_no_map():
    assert probe(lambda x, offset=0: x * (1 + offset), D) is None  # grows with the position
    assert probe(lambda x: x, D) is None  # takes no offset


def test_the_fitted_mean_is_the_pre_rope_mean_of_the_keys():
    rmap = probe(ROPES["half pairs"], D)
    mu = 3 * mx.random.normal((2, D), key=mx.random.key(2))
    x = rotate(rmap, mu, 0, 512) + 0.1 * mx.random.normal((1, 2, 512, D), key=mx.random.key(3))
    assert mx.allclose(fit_mean(rmap, x), mu * 512 / (512 + 8), atol=0.05)


def _rope_keys(n, mu_scale=4.0, seed=0):
    """Keys with a large mean before RoPE, as real keys have, in pairs turning slower than once per 128
    positions (where real keys hold most of it, and blocks of 16 positions follow it): R_t mu + noise,
    (1, 2, n, D); values."""
    rmap = probe(ROPES["half pairs"], D)
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    mu = mu_scale * mx.random.normal((2, D), key=k1) * (mx.abs(rmap.angle) < 2 * math.pi / 128)
    keys = rotate(rmap, mu, 0, n) + mx.random.normal((1, 2, n, D), key=k2)
    return rmap, keys, mx.random.normal((1, 2, n, D), key=k3)


def _feed(cache, k, v, sizes):
    queries = mx.random.normal((1, 6, k.shape[2], D), key=mx.random.key(9))
    out, pos = [], 0
    for n in sizes:
        cache.update_and_fetch(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        out.append(sdpa(queries[:, :, pos : pos + n], None, None, cache, D**-0.5, "causal" if n > 1 else None))
        pos += n
    return out


def _key_error(config, rmap, keys, values):
    cache = TurboQuantKVCache(tq_mlx.resolve_config(config, quant_start=128), rope=rmap)
    _feed(cache, keys, values, [256, 1, 1])
    got, _ = cache.all_arrays()
    return float(mx.mean((got - keys) ** 2).item())


def test_rope_centring_removes_the_turning_mean_that_a_static_mean_leaves():
    rmap, keys, values = _rope_keys(258)
    _, noise, _ = _rope_keys(258, mu_scale=0.0)
    floor = _key_error("k4v4-static", rmap, noise, values)  # the keys without their mean: what the noise costs
    assert _key_error("k4v4", rmap, keys, values) < 1.2 * floor
    assert _key_error("k4v4-static", rmap, keys, values) > 2 * floor


def test_prefill_and_decode_on_rope_centred_codes_match_exact_attention_at_8_bits():
    rmap, keys, values = _rope_keys(300)
    queries = mx.random.normal((1, 6, 300, D), key=mx.random.key(9))
    cfg = tq_mlx.CacheConfig(
        keys=tq_mlx.CodecSpec(bits=8, center="rope"), values=tq_mlx.CodecSpec(bits=8), quant_start=128
    )
    cache = TurboQuantKVCache(cfg, rope=rmap)
    got = mx.concatenate(_feed(cache, keys, values, [200, 98, 1, 1]), axis=2)
    want = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=D**-0.5, mask="causal")
    assert cache.k_codec.rope_mean is not None
    assert mx.allclose(got, want, atol=0.03)


def test_rope_centred_codes_are_only_encoded_with_their_positions():
    rmap, keys, values = _rope_keys(130)
    cache = TurboQuantKVCache(tq_mlx.resolve_config("k4v4-rope", quant_start=128), rope=rmap)
    _feed(cache, keys, values, [130])
    with pytest.raises(ValueError, match="depend on positions"):
        cache.k_codec.encode(keys)
    assert isinstance(cache.blocks()[1].k_codec, AtPositions)


def test_a_sliding_layer_reads_its_ring_at_the_positions_its_layout_gives():
    rmap, keys, values = _rope_keys(140)
    cfg = tq_mlx.CacheConfig(
        keys=tq_mlx.CodecSpec(bits=8, center="rope"), values=tq_mlx.CodecSpec(bits=8), quant_start=64
    )
    cache = TurboQuantKVCache(cfg, max_size=128, keep=4, rope=rmap)
    _feed(cache, keys, values, [100] + [1] * 40)  # the ring wraps
    assert cache.k_codec.rope_mean is not None and cache.codes.start > 0  # wrapped
    assert "k_pos" not in cache.codes.view()  # no position held per slot
    got, _ = cache.all_arrays()
    held = list(range(4)) + list(range(140 - 124, 140))
    assert mx.allclose(got, keys[:, :, mx.array(held)], atol=0.05)


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("form", ["pairs", "pairs, query rotated back", "dense"])
def test_decode_scores_per_block_equal_the_keys_decoded_with_their_turned_means(name, form):
    """The mean's score term, made per block of positions (in pairs, or as stored-domain vectors for any map), is
    <q, y~_t + R_c(t) mu> with the mean turned per key: full layers, and a ring that keeps 4 front tokens."""
    rmap = probe(ROPES[name], D)
    keys = rotate(rmap, 4 * mx.random.normal((2, D), key=mx.random.key(1)), 0, 700)
    keys = keys + mx.random.normal(keys.shape, key=mx.random.key(2))
    for ring in ({}, dict(max_size=300, keep=4)):
        cache = TurboQuantKVCache(tq_mlx.resolve_config("k4v4-rope", quant_start=64), rope=rmap, **ring)
        _feed(cache, keys, keys, [100, 500, 1, 1, 1])
        kc, enc = next((b.k_codec, b.k) for b in cache.blocks() if isinstance(b.k_codec, AtPositions))
        if form == "dense":
            kc.codec._pairs = None
        q = mx.random.normal((1, 2, 3, D), key=mx.random.key(3))
        q_rot = kc.rotate_query(q)
        if form == "pairs, query rotated back":
            q_rot = q_rot + 0
        got = kc.scores(q_rot, enc)
        want = q_rot @ mx.swapaxes(kc.decode_stored(enc), -1, -2)
        assert mx.allclose(got, want, atol=2e-4 * float(mx.abs(want).max().item())), (name, ring)


def test_a_saved_rope_centred_cache_reloads_to_the_same_attention(tmp_path):
    rmap, keys, values = _rope_keys(260)
    cache = TurboQuantKVCache(tq_mlx.resolve_config("k4v4-rope", quant_start=128), rope=rmap)
    _feed(cache, keys[:, :, :259], values[:, :, :259], [256, 1, 1, 1])
    path = str(tmp_path / "c.safetensors")
    mlx_cache.save_prompt_cache(path, [cache])
    (back,) = tq_mlx.load_prompt_cache(path)
    assert back.rope is not None and back.k_codec.rope_mean is not None
    q = mx.random.normal((1, 6, 1, D), key=mx.random.key(5))
    outs = []
    for c in (cache, back):
        c.update_and_fetch(keys[:, :, 259:], values[:, :, 259:])
        outs.append(sdpa(q, None, None, c, D**-0.5, None))
    assert mx.array_equal(outs[0], outs[1])


def test_kxvy_rope_names_still_resolve_to_rope_centred_keys_and_static_values():
    cfg = tq_mlx.resolve_config("k3v3-tcq-rope")
    assert cfg.keys.center == "rope" and cfg.values.center is True and cfg.keys.grid == "trellis"
    with pytest.raises(ValueError, match="center must be"):
        tq_mlx.CodecSpec(center="pre-rope")


def test_smollm2_full_attention_layers_get_its_rope(smol):
    model, _ = smol
    cache = tq_mlx.make_prompt_cache(model, "k4v4")
    assert all(c.rope is not None for c in cache)
    assert all(c.rope is None for c in tq_mlx.make_prompt_cache(model, "k4v4-static"))
    assert "keys centred before RoPE" in tq_mlx.describe_cache(cache)[0]


def test_rope_centring_lowers_smollm2_kl_on_real_text(smol):
    from lm_checks import kl_and_top1, teacher_forced

    from tq_mlx.bench import quality, texts

    model, tok = smol
    ids = quality.text_tokens(tok, texts.path("pride_and_prejudice"), 512)
    ref = teacher_forced(model, ids, mlx_cache.make_prompt_cache(model))
    static, _ = kl_and_top1(ref, teacher_forced(model, ids, tq_mlx.make_prompt_cache(model, "k4v4-static")))
    turned, _ = kl_and_top1(ref, teacher_forced(model, ids, tq_mlx.make_prompt_cache(model, "k4v4")))
    assert turned < 0.8 * static


def test_the_mean_turns_to_the_centre_of_each_block_of_16_positions():
    assert centres(mx.array([0, 15, 16, 40]), 16).tolist() == [7.5, 7.5, 23.5, 39.5]
    assert centres(mx.array([3]), 1).tolist() == [3.0]  # block 1: every position its own


def test_a_cache_saved_before_blocks_reloads_turned_to_every_position():
    rmap, keys, values = _rope_keys(130)
    cache = TurboQuantKVCache(tq_mlx.resolve_config("k4v4-rope", quant_start=128), rope=rmap)
    _feed(cache, keys, values, [130])
    st = dict(cache.state)
    assert st.pop("calib_k_rope_block").item() == 16
    old = TurboQuantKVCache.from_state(st)
    assert old.k_codec.rope_block == 1 and "every position" in old.k_codec.kernel_reason()


@pytest.mark.parametrize("name", list(ROPES))
def test_the_mean_turned_from_its_pairs_is_the_mean_turned_by_the_map(name):
    from tq_mlx.rope_mean import kernel_pairs, turn_pairs

    rmap = probe(ROPES[name], D)
    mu = mx.random.normal((3, 2, D), key=mx.random.key(4))  # three batch rows' means
    pos = mx.array([[[5, 700, 20001]], [[0, 16, 31]], [[9, 9, 9]]], mx.int32)
    ra = kernel_pairs(rmap, mu)[0]
    assert mx.allclose(turn_pairs(ra, 2, rmap, pos, 16), rotate_at(rmap, mu, pos, 16), atol=1e-4)


def test_a_model_s_layers_hold_one_rope_map_counted_once():
    rmaps = [probe(nn.RoPE(D, base=10000.0), D) for _ in range(3)]
    assert rmaps[0] is rmaps[1] is rmaps[2]  # one map per distinct rotation, however often probed
    rmap, keys, values = _rope_keys(300)
    caches = [TurboQuantKVCache(tq_mlx.resolve_config("k4v4", quant_start=128), i, rope=rmap) for i in range(3)]
    for c in caches:
        _feed(c, keys, values, [256, 1])
    shared = {id(a): a.nbytes for c in caches for a in c.shared_constants()}
    assert set(shared) == {id(a) for a in caches[0].shared_constants()}  # the same arrays in every layer
    assert tq_mlx.cache_nbytes(caches) == sum(c.nbytes for c in caches) + sum(shared.values())


def test_a_rope_centred_layer_holds_no_more_than_a_static_mean():
    rmap, keys, values = _rope_keys(300)
    side = {}
    for name in ("k4v4", "k4v4-static"):
        c = TurboQuantKVCache(tq_mlx.resolve_config(name, quant_start=128), rope=rmap)
        _feed(c, keys, values, [256, 1])
        side[name] = c.k_codec.side_nbytes
    assert side["k4v4"] <= side["k4v4-static"]


def test_a_ring_s_slot_positions_follow_from_its_layout():
    from tq_mlx.rope_mean import RingSlots

    class Ring:  # a wrapped ring of 10 slots keeping 3: slots 3..9 rotate, the oldest in slot 3 + 4
        ring, start, length = (10, 3), 4, 10

    slots = RingSlots.of([(Ring, 50)])  # the next code takes position 50: the rotating ones hold 43..49
    assert slots.positions(10).tolist() == [[[0, 1, 2, 46, 47, 48, 49, 43, 44, 45]]]
    assert RingSlots.of([(Ring, 50)], ordered=True).positions(10).tolist() == [[[0, 1, 2, *range(43, 50)]]]


def test_a_saved_ring_whose_positions_disagree_with_its_layout_is_refused(tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    rmap, keys, values = _rope_keys(140)
    cache = TurboQuantKVCache(tq_mlx.resolve_config("k4v4", quant_start=64), max_size=128, keep=4, rope=rmap)
    _feed(cache, keys, values, [100] + [1] * 40)
    path = str(tmp_path / "ring.safetensors")
    save_prompt_cache(path, [cache])
    arrays = dict(mx.load(path, return_metadata=True)[0])
    meta = mx.load(path, return_metadata=True)[1]
    n = cache.codes.length
    good = mx.array(cache.ring_slots(ordered=True).positions(n))
    for pos, ok in ((good, True), (good + 1, False)):  # a file from before RingSlots held each slot's position
        arrays = {k: v for k, v in arrays.items() if not k.endswith("codes_k_pos")}
        key = next(k for k in arrays if k.endswith("codes_k_norm0"))
        arrays[key.replace("k_norm0", "k_pos")] = pos
        mx.save_safetensors(path, arrays, meta)
        if ok:
            assert load_prompt_cache(path)[0].ring_slots() is not None
        else:
            with pytest.raises(tq_mlx.CacheStateError, match="do not follow its layout"):
                load_prompt_cache(path)
