"""Trellis-coded quantization (tq_mlx/trellis.py): the search, the bit layout, and the codec it makes."""

import mlx.core as mx
import numpy as np
import pytest

import tq_mlx
from tq_mlx import trellis
from tq_mlx.packing import pack, unpack
from tq_mlx.turboquant import TurboQuant

LLOYD_MAX_MSE = {2: 0.1175, 3: 0.0345, 4: 0.0095}  # Gaussian coordinates, the limit of large d


def gaussian(n, d, seed=0):
    return mx.array(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def rel_error(codec, x):
    y = codec.decode(codec.encode(x))
    return float(mx.mean(mx.sum((y - x) ** 2, -1) / mx.sum(x**2, -1)))


@pytest.mark.parametrize("bits", trellis.BITS)
def test_windows_are_the_circular_bit_string_ending_at_each_coordinate(bits):
    z = gaussian(8, 64)
    w = np.array(trellis.search(z, bits))
    stream = np.unpackbits(np.array(pack(trellis.symbols(mx.array(w), bits), bits)).view(np.uint8), bitorder="little")
    L, nb = trellis.window_bits(bits), 64 * bits
    for j in (0, 1, 2, 31, 63):  # windows that wrap around the start, and inner ones
        pos = [((j + 1) * bits - L + k) % nb for k in range(L)]
        want = (stream.reshape(8, -1)[:, pos] << np.arange(L)).sum(axis=1)
        assert (w[:, j] == want).all()


@pytest.mark.parametrize("bits", trellis.BITS)
def test_windows_rebuilt_from_the_stored_symbols_equal_the_searched_ones(bits):
    w = trellis.search(gaussian(16, 128, seed=1), bits)
    sym = unpack(pack(trellis.symbols(w, bits), bits), bits, 128)
    assert mx.array_equal(trellis.windows(sym, bits), w)


@pytest.mark.parametrize("bits", trellis.BITS)
def test_trellis_codes_beat_lloyd_max_by_a_quarter_on_gaussian_coordinates(bits):
    z = gaussian(512, 64, seed=2)
    mse = float(mx.mean((trellis.table(bits)[trellis.search(z, bits)] - z) ** 2))
    assert mse < 0.75 * LLOYD_MAX_MSE[bits]  # measured 0.0822 / 0.0213 / 0.0056: -30 / -38 / -41 %


def test_the_search_finds_the_path_nearest_to_a_vector_the_table_can_code_exactly():
    bits = 3
    sym = mx.array(np.random.default_rng(3).integers(0, 8, (4, 64)).astype(np.uint32))
    z = trellis.table(bits)[trellis.windows(sym, bits)]  # a vector on the trellis
    assert mx.array_equal(trellis.search(z, bits), trellis.windows(sym, bits))


@pytest.mark.parametrize("bits", trellis.BITS)
def test_trellis_codec_has_lloyd_max_size_and_lower_error(bits):
    x = mx.random.normal((1, 2, 256, 64), key=mx.random.key(4))
    tcq, lm = TurboQuant(64, 2, bits, grid="trellis"), TurboQuant(64, 2, bits)
    enc = tcq.encode(x)
    assert {k: v.shape for k, v in enc.items()} == {k: v.shape for k, v in lm.encode(x).items()}
    assert tcq.bits_per_element == lm.bits_per_element
    assert rel_error(tcq, x) < 0.8 * rel_error(lm, x)


def test_trellis_scores_and_accumulate_agree_with_decode_then_matmul():
    codec = TurboQuant(64, 2, 3, grid="trellis", mean=np.ones((2, 64), np.float32) * 0.1)
    x = mx.random.normal((1, 2, 40, 64), key=mx.random.key(5))
    enc = codec.encode(x)
    q = codec.rotate_query(mx.random.normal((1, 2, 3, 64), key=mx.random.key(6)))
    y = codec.decode_stored(enc)
    assert mx.allclose(codec.scores(q, enc), q @ mx.swapaxes(y, -1, -2), atol=1e-4)
    p = mx.softmax(mx.random.normal((1, 2, 3, 40), key=mx.random.key(7)), axis=-1)
    assert mx.allclose(codec.accumulate(p, enc), p @ y, atol=1e-4)


def test_trellis_presets_and_their_limits():
    assert tq_mlx.resolve_config("k4v4-tcq").keys.grid == "trellis"
    assert tq_mlx.resolve_config("k4v3-tcq").values.bits == 3
    with pytest.raises(ValueError, match=r"trellis grid codes \(2, 3, 4\) bits"):
        tq_mlx.resolve_config("k8v8-tcq")
    with pytest.raises(ValueError, match="trellis grid codes"):
        tq_mlx.CodecSpec(bits=4, qjl=True, grid="trellis")


def test_a_trellis_cache_stages_decode_tokens_and_encodes_them_in_blocks():
    cache = tq_mlx.TurboQuantKVCache(tq_mlx.resolve_config("k4v4-tcq", quant_start=0))
    k, v = (mx.random.normal((1, 1, 40, 64), key=mx.random.key(i)) for i in (8, 9))
    cache.update_and_fetch(k[:, :, :20], v[:, :, :20])
    sdpa = tq_mlx.patch.tq_scaled_dot_product_attention
    sdpa(mx.zeros((1, 1, 20, 64)), *cache.handed, cache, 0.125, "causal")  # calibrates, stores the 20
    sizes = []
    for t in range(20, 40):
        cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
        sdpa(mx.zeros((1, 1, 1, 64)), *cache.handed, cache, 0.125, None)
        sizes.append((cache.codes.length, cache.window.length))
    E = trellis.ENCODE_BLOCK
    assert all(w < E for _, w in sizes) and sizes[-1][0] + sizes[-1][1] == 40 - cache.sink.length
    assert len({c for c, _ in sizes}) == 2  # the codes grew once, by a whole block
    assert cache.window.capacity <= E  # the staging costs at most E fp16 tokens


def test_a_reloaded_trellis_cache_keeps_staging():
    cache = tq_mlx.TurboQuantKVCache(tq_mlx.resolve_config("k3v3-tcq", quant_start=0))
    k = mx.random.normal((1, 1, 21, 64), key=mx.random.key(10))
    cache.update_and_fetch(k, k)
    tq_mlx.patch.tq_scaled_dot_product_attention(mx.zeros((1, 1, 21, 64)), *cache.handed, cache, 0.125, "causal")
    again = tq_mlx.TurboQuantKVCache.from_state(cache.state)
    assert again.window.ring is None and again.window.step == trellis.ENCODE_BLOCK
    assert (again.codes.length, again.window.length) == (cache.codes.length, cache.window.length)
