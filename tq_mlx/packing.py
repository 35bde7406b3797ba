"""Exact bit packing of b-bit codes in bit-plane groups of 32.

Layout (the same on the CPU and in the Metal kernels): the codes of one vector
are split into groups of 32 consecutive codes.  Group g is stored in `bits`
consecutive uint32 words; word j of the group holds bit j of every code of the
group, code `g*32 + lane` at bit position `lane`:

    words[g*bits + j] bit lane  ==  (codes[g*32 + lane] >> j) & 1

So 32 codes take exactly `bits` words at every width, with no wasted bits when
the vector length is a multiple of 32 (a partial last group is zero-padded).
A kernel thread that owns lane `l` of a group unpacks its code with `bits`
broadcast loads and shifts: code = sum_j ((w[g*bits + j] >> l) & 1) << j.
"""

from functools import partial

import mlx.core as mx

MAX_PACK_BITS = 16
_LANES = mx.arange(32, dtype=mx.uint32)


def packed_words(n: int, bits: int) -> int:
    """uint32 words that hold n codes of `bits` bits."""
    return -(-n // 32) * bits


def _check_bits(bits: int):
    if not (isinstance(bits, int) and 1 <= bits <= MAX_PACK_BITS):
        raise ValueError(f"pack bits={bits!r} is unsupported; allowed: 1..{MAX_PACK_BITS}")


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack codes (..., n) of any unsigned/int dtype, values < 2**bits, into uint32 (..., packed_words(n, bits))."""
    _check_bits(bits)
    n = codes.shape[-1]
    groups = -(-n // 32)
    c = codes.astype(mx.uint32)
    if groups * 32 != n:
        pad = [(0, 0)] * (c.ndim - 1) + [(0, groups * 32 - n)]
        c = mx.pad(c, pad)
    c = c.reshape(*c.shape[:-1], groups, 1, 32)
    planes = mx.arange(bits, dtype=mx.uint32).reshape(bits, 1)
    bit = (c >> planes) & 1  # (..., G, bits, 32)
    words = (bit << _LANES).sum(axis=-1).astype(mx.uint32)
    return words.reshape(*codes.shape[:-1], groups * bits)


@partial(mx.compile, shapeless=True)
def _assemble(lanes, *planes):
    """codes = sum_j ((plane_j >> lane) & 1) << j, fused into one elementwise kernel for any shape."""
    out = (planes[0] >> lanes) & 1
    for j in range(1, len(planes)):
        out = out | (((planes[j] >> lanes) & 1) << j)
    return out


def unpack(words: mx.array, bits: int, n: int) -> mx.array:
    """Inverse of pack: uint32 (..., packed_words(n, bits)) -> uint32 codes (..., n)."""
    _check_bits(bits)
    groups = -(-n // 32)
    if words.shape[-1] != groups * bits:
        raise ValueError(f"expected {groups * bits} packed words for n={n}, bits={bits}; got {words.shape[-1]}")
    w = words.reshape(*words.shape[:-1], groups, bits)
    planes = [w[..., j : j + 1] for j in range(bits)]  # (..., G, 1) each
    codes = _assemble(_LANES, *planes).reshape(*words.shape[:-1], groups * 32)
    return codes[..., :n] if groups * 32 != n else codes
