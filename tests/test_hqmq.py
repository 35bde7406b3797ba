"""HQMQ: Hurwitz quaternion codebooks, gain-shape chunks and Med3x outliers (docs/hqmq.md)."""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_mlx.hqmq import CONFIGS, HQMQ, hurwitz_units, quat_mul

PAPER_BITS = {"s24_r3": 3.17, "s96_r4": 3.92, "s192_r6": 4.67}  # d = 128


def unit_vectors(heads, n, d, seed=0):
    x = mx.random.normal((1, heads, n, d), key=mx.random.key(seed))
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def d_mse(codec, x):
    return float(((x - codec.decode(codec.encode(x))) ** 2).sum(-1).mean())


def with_outliers(heads=2, n=64, d=64, chunks=None, seed=0):
    """Gaussian vectors (chunk norms ~2) with chunk c replaced by a random direction of norm chunks[c]."""
    chunks = {3: 40.0} if chunks is None else chunks
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, heads, n, d)).astype(np.float32)
    for c, size in chunks.items():
        u = rng.standard_normal((1, heads, n, 4))
        x[..., 4 * c : 4 * c + 4] = size * u / np.linalg.norm(u, axis=-1, keepdims=True)
    return mx.array(x)


# ---- the codebook ---------------------------------------------------------------


def test_hurwitz_units_are_the_24_unit_quaternions_of_a_group():
    u = hurwitz_units()
    assert u.shape == (24, 4) and len({tuple(r) for r in u}) == 24
    np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0)
    products = {tuple(np.round(quat_mul(a, b), 9)) for a in u for b in u}
    assert products == {tuple(r) for r in np.round(u, 9)}


def test_codebook_is_24_s_unit_codewords_per_head():
    codec = HQMQ(64, 3, "s24_r3")
    words = np.array(codec.codewords).reshape(3, 24 * 24, 4)
    np.testing.assert_allclose(np.linalg.norm(words, axis=-1), 1.0, atol=1e-6)
    assert len({tuple(r) for r in np.round(words[0], 5)}) == 24 * 24
    assert not np.allclose(words[0], words[1])


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_direction_is_the_nearest_codeword_by_inner_product(config):
    codec = HQMQ(64, 2, config, max_outliers=0)
    x = unit_vectors(2, 100, 64, 1)
    enc = codec.encode(x)
    idx = np.array(codec.unpack_codes(enc)[0])  # (1, 2, 100, 16)
    u = np.array(x).reshape(1, 2, 100, 16, 4)
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    words = np.array(codec.codewords).reshape(2, -1, 4)
    ip = np.einsum("bhtcq,hkq->bhtck", u, words)
    chosen = np.take_along_axis(ip, idx[..., None].astype(np.int64), axis=-1)[..., 0]
    np.testing.assert_allclose(chosen, ip.max(-1), atol=1e-5)


# ---- bits -------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(PAPER_BITS))
def test_bits_per_element_is_the_papers_count(config):
    assert HQMQ(128, 1, config, max_outliers=0).bits_per_element == pytest.approx(PAPER_BITS[config], abs=0.005)


def test_each_outlier_slot_adds_a_byte_index_and_four_fp16_values():
    base = HQMQ(128, 1, "s96_r4", max_outliers=0).bits_per_element
    assert HQMQ(128, 1, "s96_r4", max_outliers=2).bits_per_element == pytest.approx(base + 2 * 72 / 128)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("max_outliers", [0, 2])
def test_stored_bits_per_element_is_what_the_arrays_hold(config, max_outliers):
    codec = HQMQ(128, 2, config, max_outliers=max_outliers)
    enc = codec.encode(unit_vectors(2, 10, 128, 2))
    held = sum(a.nbytes for a in enc.values()) * 8 / (2 * 10 * 128)
    assert codec.stored_bits_per_element == pytest.approx(held)
    assert codec.bits_per_element <= codec.stored_bits_per_element < codec.bits_per_element + 0.25


@pytest.mark.parametrize("d", [64, 80, 96])
def test_codes_are_packed_without_padding_chunks_to_32(d):
    codec = HQMQ(d, 1, "s96_r4", max_outliers=0)  # 16 bits a chunk
    assert codec.stored_bits_per_element == pytest.approx((32 * math.ceil(16 * d / 4 / 32) + 16) / d)


# ---- distortion ---------------------------------------------------------------------


def test_distortion_falls_from_s24_r3_to_s96_r4_to_s192_r6():
    x = unit_vectors(2, 2000, 128, 3)
    got = [d_mse(HQMQ(128, 2, c), x) for c in ("s24_r3", "s96_r4", "s192_r6")]
    assert got[0] > got[1] > got[2]
    assert got[0] < 0.05 and got[2] > 0.004  # between TurboQuant's 3-bit and 5-bit distortions


def test_radius_error_is_at_most_half_a_step():
    codec = HQMQ(64, 2, "s24_r3", max_outliers=0)
    x = 3.0 * unit_vectors(2, 200, 64, 4)
    enc = codec.encode(x)
    r = mx.linalg.norm(x.reshape(1, 2, 200, 16, 4), axis=-1)
    r_hat = mx.linalg.norm(codec.decode(enc).reshape(1, 2, 200, 16, 4), axis=-1)
    step = enc["scale"].astype(mx.float32)[..., None] / 7
    assert bool(mx.all(mx.abs(r - r_hat) <= step / 2 * 1.002 + 1e-6))


# ---- Med3x outliers -----------------------------------------------------------------


def test_flagged_outlier_chunks_come_back_exactly_in_fp16():
    codec = HQMQ(64, 2, "s96_r4")
    x = with_outliers(chunks={3: 40.0, 9: 25.0})
    xd = codec.decode(codec.encode(x))
    for c in (3, 9):
        sl = slice(4 * c, 4 * c + 4)
        assert mx.array_equal(xd[..., sl], x[..., sl].astype(mx.float16).astype(mx.float32))


def test_outliers_are_left_out_of_the_token_scale():
    codec = HQMQ(64, 2, "s96_r4")
    x = with_outliers(chunks={3: 1000.0})
    enc = codec.encode(x)
    assert float(enc["scale"].astype(mx.float32).max()) < 20.0
    rest = mx.concatenate([x[..., :12], x[..., 16:]], axis=-1)
    rest_hat = mx.concatenate([codec.decode(enc)[..., :12], codec.decode(enc)[..., 16:]], axis=-1)
    assert float(((rest - rest_hat) ** 2).sum() / (rest**2).sum()) < 0.03


def test_outliers_beyond_the_budget_are_quantized_normally():
    codec = HQMQ(64, 1, "s96_r4", max_outliers=1)
    x = with_outliers(heads=1, chunks={2: 80.0, 5: 30.0})
    enc = codec.encode(x)
    assert bool(mx.all(enc["oidx"][..., 0] == 2))  # the largest takes the one slot
    np.testing.assert_allclose(np.array(enc["scale"].astype(mx.float32)), 30.0, rtol=1e-3)  # chunk 5 sets the scale
    err = mx.linalg.norm(codec.decode(enc)[..., 20:24] - x[..., 20:24], axis=-1) / 30.0
    assert 0 < float(err.max()) < 0.35


def test_no_outlier_slot_is_used_for_ordinary_data():
    enc = HQMQ(128, 2, "s96_r4").encode(unit_vectors(2, 200, 128, 5))
    assert bool(mx.all(enc["oidx"] == 255)) and float(mx.abs(enc["oval"].astype(mx.float32)).max()) == 0.0


def test_median_is_taken_from_the_first_data_and_kept():
    codec = HQMQ(64, 2, "s24_r3")
    assert codec.median is None
    x = with_outliers()
    codec.encode(x)
    chunk_norms = np.linalg.norm(np.array(x).reshape(1, 2, 64, 16, 4), axis=-1)
    np.testing.assert_allclose(np.array(codec.median), np.median(chunk_norms, axis=(0, 2, 3)), rtol=1e-6)
    first = np.array(codec.median)
    codec.encode(100.0 * x)
    np.testing.assert_array_equal(np.array(codec.median), first)


def test_a_restored_median_gives_identical_codes():
    x = with_outliers(seed=6)
    a = HQMQ(64, 2, "s96_r4")
    enc_a = a.encode(x)
    b = HQMQ(64, 2, "s96_r4", median=np.array(a.median).tolist())
    enc_b = b.encode(10 * x)
    enc_b = b.encode(x)
    assert all(mx.array_equal(enc_a[k], enc_b[k]) for k in enc_a)


def test_calibrate_sets_the_median_explicitly():
    codec = HQMQ(64, 2, "s24_r3")
    med = codec.calibrate(2.0 * unit_vectors(2, 30, 64, 7))
    assert med.shape == (2,) and mx.array_equal(codec.median, med)


# ---- the codec interface ------------------------------------------------------------


def test_every_stored_array_has_leading_dims_b_h_t():
    enc = HQMQ(96, 3, "s96_r4").encode(mx.random.normal((2, 3, 7, 96)))
    assert set(enc) == {"codes", "scale", "oidx", "oval"}
    assert all(a.shape[:3] == (2, 3, 7) for a in enc.values())


def test_encoded_blocks_concatenate_and_slice_along_tokens():
    codec = HQMQ(64, 2, "s24_r3")
    x = with_outliers(n=30)
    a, b = codec.encode(x[:, :, :18]), codec.encode(x[:, :, 18:])
    joined = {k: mx.concatenate([a[k], b[k]], axis=2) for k in a}
    whole = codec.decode(joined)
    assert mx.array_equal(whole, mx.concatenate([codec.decode(a), codec.decode(b)], axis=2))
    assert mx.array_equal(codec.decode({k: v[:, :, :10] for k, v in joined.items()}), whole[:, :, :10])


@pytest.mark.parametrize("max_outliers", [0, 2])
def test_scores_and_accumulate_agree_with_decode_then_matmul(max_outliers):
    codec = HQMQ(64, 2, "s96_r4", max_outliers=max_outliers)
    x, q = with_outliers(n=40), mx.random.normal((1, 2, 5, 64), key=mx.random.key(8))
    enc = codec.encode(x)
    dense = codec.decode(enc)
    s = codec.scores(codec.rotate_query(q), enc)
    np.testing.assert_allclose(np.array(s), np.array(q @ mx.swapaxes(dense, -1, -2)), rtol=1e-5, atol=1e-3)
    p = mx.softmax(s / 8, axis=-1)
    out = codec.unrotate(codec.accumulate(p, enc))
    np.testing.assert_allclose(np.array(out), np.array(p @ dense), rtol=1e-5, atol=1e-4)


def test_query_rotation_is_the_identity():
    codec, q = HQMQ(64, 2), mx.random.normal((1, 2, 3, 64)).astype(mx.float16)
    assert codec.rotate_query(q).dtype == mx.float32
    assert mx.array_equal(codec.rotate_query(q), q.astype(mx.float32))
    assert mx.array_equal(codec.unrotate(q), q)


def test_side_bytes_grow_with_s():
    assert 0 < HQMQ(128, 2, "s24_r3").side_nbytes < HQMQ(128, 2, "s192_r6").side_nbytes


def test_zero_vectors_decode_to_zero():
    codec = HQMQ(64, 1, max_outliers=0)
    assert float(mx.abs(codec.decode(codec.encode(mx.zeros((1, 1, 3, 64))))).max()) == 0.0


def test_same_seed_gives_bit_identical_codes():
    x = unit_vectors(2, 50, 64, 9)
    a, b = HQMQ(64, 2, seed=3, layer=4).encode(x), HQMQ(64, 2, seed=3, layer=4).encode(x)
    assert all(mx.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("other", [dict(seed=4), dict(layer=5), dict(part="v")])
def test_a_different_seed_layer_or_part_gives_different_codes(other):
    x = unit_vectors(2, 50, 64, 9)
    base = dict(seed=3, layer=4, part="k")
    assert not mx.array_equal(
        HQMQ(64, 2, **base).encode(x)["codes"], HQMQ(64, 2, **{**base, **other}).encode(x)["codes"]
    )


@settings(max_examples=15, deadline=None)
@given(
    config=st.sampled_from(sorted(CONFIGS)),
    d=st.sampled_from([8, 64, 80, 128]),
    log2_scale=st.integers(-8, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_codec_invariants(config, d, log2_scale, seed):
    codec = HQMQ(d, 2, config, max_outliers=0, norm_dtype="float32")
    x = mx.random.normal((1, 2, 6, d), key=mx.random.key(seed))
    enc = codec.encode(x)
    idx, rcode = codec.unpack_codes(enc)
    assert int(idx.max().item()) < 24 * CONFIGS[config][0]
    assert int(rcode.max().item()) == 2**codec.radius_bits - 1  # each token's largest chunk sits on the top level
    enc2 = codec.encode(x * 2.0**log2_scale)  # exact scaling: same codes, scaled reconstruction
    assert mx.array_equal(enc2["codes"], enc["codes"])
    np.testing.assert_allclose(
        np.array(codec.decode(enc2)),
        np.array(codec.decode(enc)) * 2.0**log2_scale,
        rtol=1e-5,
        atol=1e-6 * 2.0**log2_scale,
    )


# ---- error paths ---------------------------------------------------------------------


@pytest.mark.parametrize("d", [66, 130, 0, 1024, 64.0])
def test_rejects_d_that_is_not_a_supported_multiple_of_4(d):
    with pytest.raises(ValueError, match="multiple of 4"):
        HQMQ(d, 1)


def test_rejects_an_unknown_config_and_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="s96_r4"):
        HQMQ(64, 1, "s100_r4")


def test_rejects_a_median_of_the_wrong_shape():
    with pytest.raises(ValueError, match="median"):
        HQMQ(64, 2, median=[1.0, 2.0, 3.0])


def test_rejects_unknown_norm_dtype():
    with pytest.raises(ValueError, match="norm_dtype"):
        HQMQ(64, 1, norm_dtype="int8")


@pytest.mark.parametrize("k", [-1, 17, 1.5])
def test_rejects_an_impossible_outlier_budget(k):
    with pytest.raises(ValueError, match="max_outliers"):
        HQMQ(64, 1, max_outliers=k)


def test_bits_formula_uses_log2_of_the_codebook_size():
    c = HQMQ(256, 1, "s96_r4", max_outliers=0)
    assert c.bits_per_element == pytest.approx((math.log2(24 * 96) + 4) / 4 + 16 / 256)
