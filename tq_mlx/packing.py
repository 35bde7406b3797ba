"""Exact bit packing of b-bit codes: a dense little-endian bit string per vector.

Layout (the same on the CPU and in the Metal kernels): the codes of one vector
form one bit string, code j in bits [b*j, b*j + b), least significant bit
first; bit k of the string is bit (k % 32) of uint32 word k // 32.  A vector of
n codes takes ceil(n * b / 32) words: nothing is wasted when 32 divides n * b,
at most 31 bits otherwise.

Eight consecutive codes take exactly b bytes from a byte boundary, so a kernel
thread that owns dims [8c, 8c + 8) reads its b bytes with one or two word loads
and shifts (`metal_kernels/tq_common.h`).  Every 32 codes take exactly b words,
which is how the CPU functions below work: one fused kernel per width.
"""

from functools import cache, partial

import mlx.core as mx

MAX_PACK_BITS = 8  # 8 codes fit in 64 bits (the CPU unpack of odd widths)


def packed_words(n: int, bits: int) -> int:
    """uint32 words that hold n codes of `bits` bits."""
    return -(-n * bits // 32)


def _check_bits(bits: int):
    if not (isinstance(bits, int) and 1 <= bits <= MAX_PACK_BITS):
        raise ValueError(f"pack bits={bits!r} is unsupported; allowed: 1..{MAX_PACK_BITS}")


@cache
def _shifts(bits: int):
    """Constants (bits, 32) for a group of 32 codes and its `bits` words: code k's bit i is bit
    b*k + i - 32*w of word w, reached by << rsh >> lsh; valid marks the runs that exist."""
    w = mx.arange(bits, dtype=mx.int32)[:, None]
    start = mx.arange(32, dtype=mx.int32)[None, :] * bits - 32 * w
    valid = ((start < 32) & (start > -bits)).astype(mx.uint32)
    rsh = mx.maximum(start, 0).astype(mx.uint32)
    lsh = mx.maximum(-start, 0).astype(mx.uint32)
    mx.eval(rsh, lsh, valid)  # cached: evaluated now, so any thread can use them
    return rsh, lsh, valid


@partial(mx.compile, shapeless=True)
def _pack_runs(c, rsh, lsh, valid):
    """codes (..., G, 1, 32) -> each code's run in each word (..., G, bits, 32); the caller sums them
    (their bits are disjoint).  MLX 0.32's shapeless compile crashes on a reduction after such a
    broadcast, so the sum stays outside."""
    return ((c << rsh) >> lsh) * valid


@partial(mx.compile, shapeless=True)
def _shift_mask(words, shifts, mask):
    """words (..., W, 1) -> codes (..., W, 32 / b) when b divides 32."""
    return (words >> shifts) & mask


@partial(mx.compile, shapeless=True)
def _from_bytes(shifts, mask, *planes):
    """Byte planes (..., C, 1) of 8-code chunks (b bytes each, least significant first) -> codes (..., C, 8)."""
    x = planes[0].astype(mx.uint64)
    for i, p in enumerate(planes[1:], 1):
        x = x | (p.astype(mx.uint64) << (8 * i))
    return ((x >> shifts) & mask).astype(mx.uint32)


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack codes (..., n), values < 2**bits, into uint32 (..., packed_words(n, bits))."""
    _check_bits(bits)
    n = codes.shape[-1]
    c = codes.astype(mx.uint32)
    if n % 32:
        c = mx.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, -n % 32)])
    words = _pack_runs(c.reshape(*c.shape[:-1], -1, 1, 32), *_shifts(bits)).sum(axis=-1).astype(mx.uint32)
    words = words.reshape(*c.shape[:-1], -1)
    nw = packed_words(n, bits)
    return words[..., :nw] if words.shape[-1] != nw else words


def unpack(words: mx.array, bits: int, n: int) -> mx.array:
    """Inverse of pack: uint32 (..., packed_words(n, bits)) -> uint32 codes (..., n)."""
    _check_bits(bits)
    nw = packed_words(n, bits)
    if words.shape[-1] != nw:
        raise ValueError(f"expected {nw} packed words for n={n}, bits={bits}; got {words.shape[-1]}")
    groups = -(-n // 32)
    if groups * bits != nw:
        words = mx.pad(words, [(0, 0)] * (words.ndim - 1) + [(0, groups * bits - nw)])
    lead = words.shape[:-1]
    if 32 % bits == 0:
        shifts = mx.arange(32 // bits, dtype=mx.uint32) * bits
        codes = _shift_mask(words[..., None], shifts, mx.array((1 << bits) - 1, dtype=mx.uint32))
    else:  # every 8 codes are b whole bytes
        chunks = words.view(mx.uint8).reshape(*lead, groups * 4, bits)
        planes = [chunks[..., i : i + 1] for i in range(bits)]
        shifts = mx.arange(8, dtype=mx.uint64) * bits
        codes = _from_bytes(shifts, mx.array((1 << bits) - 1, dtype=mx.uint64), *planes)
    codes = codes.reshape(*lead, groups * 32)
    return codes[..., :n] if groups * 32 != n else codes
