"""Bit-plane packing of b-bit codes into uint32 words."""

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


def test_partial_group_is_padded_to_a_whole_group():
    assert packed_words(33, 3) == 6 and packed_words(1, 5) == 5


def test_layout_is_bit_planes_of_32_lanes():
    bits, n = 3, 64
    codes = np.random.default_rng(1).integers(0, 2**bits, size=n).astype(np.uint64)
    words = np.array(pack(mx.array(codes.astype(np.uint32)), bits)).astype(np.uint64)
    for g in range(n // 32):
        for j in range(bits):
            expect = sum(int((codes[g * 32 + lane] >> j) & 1) << lane for lane in range(32))
            assert int(words[g * bits + j]) == expect


def test_leading_dims_are_kept():
    codes = random_codes((2, 3, 4, 40), 5)
    assert pack(codes, 5).shape == (2, 3, 4, packed_words(40, 5))


def test_maximum_codes_survive():
    codes = mx.full((70,), 2**16 - 1, dtype=mx.uint32)
    assert mx.array_equal(unpack(pack(codes, 16), 16, 70), codes)


def test_accepts_narrow_integer_dtypes():
    codes = mx.array(np.arange(64) % 16, dtype=mx.uint8)
    assert mx.array_equal(unpack(pack(codes, 4), 4, 64), codes.astype(mx.uint32))


@pytest.mark.parametrize("bits", [0, 17, 2.0])
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
