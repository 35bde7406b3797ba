"""Dense little-endian packing of b-bit codes into uint32 words (the layout the Metal kernels read)."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_mlx.packing import MAX_PACK_BITS, pack, packed_words, unpack


def random_codes(shape, bits, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 2**bits, size=shape, dtype=np.uint32))


@pytest.mark.parametrize("bits", range(1, MAX_PACK_BITS + 1))
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 100, 128])
def test_unpack_inverts_pack(bits, n):
    codes = random_codes((3, n), bits, seed=bits * 1000 + n)
    words = pack(codes, bits)
    assert words.dtype == mx.uint32 and words.shape == (3, packed_words(n, bits))
    assert mx.array_equal(unpack(words, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [32, 64, 96, 128, 256])
def test_packed_size_is_exactly_n_bits_over_32_when_32_divides_n(bits, n):
    assert pack(random_codes((n,), bits), bits).shape == (n * bits // 32,)


def test_a_partial_word_is_padded_to_a_whole_word():
    assert packed_words(33, 3) == 4 and packed_words(1, 5) == 1 and packed_words(80, 3) == 8


@pytest.mark.parametrize("bits,n", [(3, 64), (5, 40), (7, 17), (4, 80)])
def test_layout_is_one_little_endian_bit_string(bits, n):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=n)
    words = np.array(pack(mx.array(codes.astype(np.uint32)), bits)).astype(np.uint64)
    string = sum(int(w) << (32 * i) for i, w in enumerate(words))
    for j in range(n):
        assert (string >> (bits * j)) & (2**bits - 1) == codes[j]


def test_eight_codes_start_on_a_byte_boundary():
    """What a kernel thread owning 8 dims relies on: its codes are bytes [b*c, b*(c+1)) of the row."""
    bits, n = 3, 64
    codes = np.random.default_rng(2).integers(0, 8, size=n)
    row = np.array(pack(mx.array(codes.astype(np.uint32)), bits)).view(np.uint8)
    for c in range(n // 8):
        chunk = int.from_bytes(row[bits * c : bits * (c + 1)].tobytes(), "little")
        assert [(chunk >> (bits * i)) & 7 for i in range(8)] == list(codes[8 * c : 8 * c + 8])


def test_leading_dims_are_kept():
    codes = random_codes((2, 3, 4, 40), 5)
    assert pack(codes, 5).shape == (2, 3, 4, packed_words(40, 5))


@pytest.mark.parametrize("bits", range(1, MAX_PACK_BITS + 1))
def test_maximum_codes_survive(bits):
    codes = mx.full((70,), 2**bits - 1, dtype=mx.uint32)
    assert mx.array_equal(unpack(pack(codes, bits), bits, 70), codes)


def test_accepts_narrow_integer_dtypes():
    codes = mx.array(np.arange(64) % 16, dtype=mx.uint8)
    assert mx.array_equal(unpack(pack(codes, 4), 4, 64), codes.astype(mx.uint32))


@pytest.mark.parametrize("bits", [0, 9, 2.0])
def test_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack(random_codes((32,), 1), bits)


def test_unpack_rejects_a_wrong_word_count():
    with pytest.raises(ValueError, match="packed words"):
        unpack(mx.zeros((5,), dtype=mx.uint32), 3, 64)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, MAX_PACK_BITS),
    lead=st.lists(st.integers(1, 3), max_size=3),
    n=st.integers(1, 200),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_round_trip_property(bits, lead, n, seed):
    codes = random_codes((*lead, n), bits, seed)
    words = pack(codes, bits)
    assert words.shape == (*lead, packed_words(n, bits))
    assert mx.array_equal(unpack(words, bits, n), codes)
