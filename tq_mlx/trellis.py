"""Trellis-coded quantization (TCQ) of rotated coordinates: a tail-biting bitshift trellis, as in QTIP.

Each coordinate stores b bits, as a Lloyd-Max code does, but its value is read from a table of 2**L
entries (L = b + EXTRA) at the L-bit window of the vector's bit string that ends with the coordinate's
own b bits.  Windows overlap, so the codes of neighbouring coordinates are chosen together: a Viterbi
search over 2**(L - b) states finds the bit string whose windows are nearest to the vector.  At equal
bits this lowers the mean squared error of Gaussian coordinates by about a third against Lloyd-Max
(`tests/test_trellis.py` measures it); decoding is still one table read per coordinate.

Layout.  The symbols (b bits per coordinate) are packed exactly as Lloyd-Max codes (packing.py:
coordinate j in bits [b j, b j + b) of the vector's bit string); coordinate j's window is bits
[(j + 1) b - L, (j + 1) b) of that string read circularly (the first coordinates wrap to its end), so
no start state is stored: the search is tail-biting (a free pass, then a pass started and ended in the
state the free pass had half-way, on the vector rotated by half).
Tables: trained once on N(0, 1) coordinates by Lloyd iterations over Viterbi assignments (`train_table`)
and shipped in `trellis_tables/`; `python -m tq_mlx.trellis` rebuilds them.  With the Metal kernels on,
`kernels.viterbi_encode` (metal_kernels/tq_viterbi.metal) runs the same search, rotation and packing in one
launch; `search` here is the path of every other back-end (and the reference the kernel is tested against).
The coordinates coded are sqrt(n) * y / |y|, close to N(0, 1) for a randomly rotated vector y of size n.
"""

import math
import sys
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import TRELLIS_BITS
from .packing import pack, packed_words, unpack

EXTRA = 6  # L = bits + EXTRA: 64 trellis states
BITS = TRELLIS_BITS  # the widths with a shipped table (at most EXTRA: a window holds the previous state whole)
ENCODE_BLOCK = 16  # decode steps stage this many tokens in fp16 before one search (a search of few vectors
#                   costs its ~4 d compiled steps whatever their number)
CHUNK = 4096  # vectors searched at once (the back-pointers take CHUNK * n * 2**(L-b) bytes)
TABLES = Path(__file__).parent / "trellis_tables"


def window_bits(bits: int) -> int:
    return bits + EXTRA


def _table_path(bits: int) -> Path:
    return TABLES / f"tcq_b{bits}_L{window_bits(bits)}.npy"


@cache
def table(bits: int) -> mx.array:
    """The shipped table for `bits`: float32 (2**L,) values of N(0, 1)-scaled coordinates."""
    if bits not in BITS:
        raise ValueError(f"trellis codes have tables for {BITS} bits, got {bits!r}")
    t = mx.array(np.load(_table_path(bits)).astype(np.float32))
    mx.eval(t)  # cached: evaluated now, so any thread can use it
    return t


@cache
def _steps(bits: int):
    """The compiled forward step (costs of the 2**(L-b) states after one coordinate, and for each the
    dropped low b bits of its best window) and the backtracking step."""
    L = window_bits(bits)
    S, B = 1 << (L - bits), 1 << bits

    @mx.compile
    def forward(cost, zj, tbl):
        # window w = s * B + t: new state s = w >> b, previous state w & (S - 1) = (s mod S/B) * B + t
        n = cost.shape[0]
        prev = mx.broadcast_to(cost.reshape(n, 1, S // B, B), (n, B, S // B, B)).reshape(n, S, B)
        c = prev + mx.square(zj - tbl)
        return mx.min(c, axis=-1), mx.argmin(c, axis=-1).astype(mx.uint8)

    @mx.compile
    def backward(s, back):
        w = s * B + mx.take_along_axis(back, s[:, None], axis=1)[:, 0].astype(mx.uint32)
        return w, w & (S - 1)

    return forward, backward


def viterbi(z: mx.array, bits: int, tbl: mx.array, start=None) -> mx.array:
    """Windows (N, n) uint32 of the path through table `tbl` (2**L,) nearest to z (N, n) float32; `start`
    (N,) uint32 fixes the state before the first coordinate and after the last (else both are free)."""
    N, n = z.shape
    L = window_bits(bits)
    S = 1 << (L - bits)
    forward, backward = _steps(bits)
    tbl = tbl.reshape(1, S, 1 << bits)
    if start is None:
        cost = mx.zeros((N, S))
    else:
        cost = mx.where(mx.arange(S, dtype=mx.uint32)[None] == start[:, None], 0.0, math.inf)
    zs = z.T[:, :, None, None]
    backs = []
    for j in range(n):
        cost, bk = forward(cost, zs[j], tbl)
        backs.append(bk)
    s = mx.argmin(cost, axis=-1).astype(mx.uint32) if start is None else start
    out = [None] * n
    for j in reversed(range(n)):
        out[j], s = backward(s, backs[j])
    return mx.stack(out, axis=1)


def search(z: mx.array, bits: int) -> mx.array:
    """Tail-biting windows (..., n) uint32 for coordinates z (..., n): every window is the L bits of the
    circular symbol string ending with its coordinate's symbol."""
    lead, n = z.shape[:-1], z.shape[-1]
    z = z.reshape(-1, n).astype(mx.float32)
    m, tbl = n // 2, table(bits)
    parts = []
    for a in range(0, z.shape[0], CHUNK):
        zc = z[a : a + CHUNK]
        free = viterbi(zc, bits, tbl)
        mid = free[:, m - 1] >> bits  # the state after coordinate m - 1
        turned = viterbi(mx.concatenate([zc[:, m:], zc[:, :m]], axis=1), bits, tbl, start=mid)
        parts.append(mx.concatenate([turned[:, n - m :], turned[:, : n - m]], axis=1))
    w = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
    return w.reshape(*lead, n)


def symbols(windows: mx.array, bits: int) -> mx.array:
    """Each coordinate's own b bits: the top b bits of its window (uint32)."""
    return windows >> (window_bits(bits) - bits)


@cache
def _window_shifts(bits: int):
    """For window bits L: the symbols j - i (i = 0..ceil(L/b) - 1) sit at offset L - (i + 1) b."""
    L = window_bits(bits)
    return [L - (i + 1) * bits for i in range(-(-L // bits))]


def windows(sym: mx.array, bits: int) -> mx.array:
    """Every coordinate's window from the symbols (..., n) uint32 (circular: what a kernel reads)."""
    w = mx.zeros(sym.shape, dtype=mx.uint32)
    for i, off in enumerate(_window_shifts(bits)):
        prev = sym if i == 0 else mx.roll(sym, i, axis=-1)
        w = w | (prev << off if off >= 0 else prev >> -off)
    return w & ((1 << window_bits(bits)) - 1)


class TrellisSegment:
    """One trellis-coded segment over `n` rotated coordinates (the `turboquant.Segment` interface):
    encodings {"codes": uint32 (.., packed_words(n, bits)), "norm": (..)}; y ~ norm * table[w] / sqrt(n)."""

    qjl = False

    def __init__(self, n: int, bits: int, norm_correction: bool = True):
        self.n, self.bits, self.mse_bits = n, bits, bits
        self.norm_correction = norm_correction
        self.table = self.levels = table(bits)  # what the kernels read as the codebook
        self.window = window_bits(bits)

    side_nbytes = 0  # the table is one per width for the whole process (at most 4 KiB), as the codebooks

    def stored_bits(self, norm_bits: int) -> float:
        return (32 * packed_words(self.n, self.bits) + norm_bits) / self.n

    def encode(self, y: mx.array, norm_dtype) -> dict:
        norm = mx.linalg.norm(y, axis=-1)
        z = y * (math.sqrt(self.n) / mx.maximum(norm, 1e-30))[..., None]
        w = search(z, self.bits)
        c = self.table[w]
        scale = norm / math.sqrt(self.n)
        if self.norm_correction:
            scale = norm / mx.maximum(mx.linalg.norm(c, axis=-1), 1e-30)
        return {"codes": pack(symbols(w, self.bits), self.bits), "norm": scale.astype(norm_dtype)}

    def _unit(self, enc: dict) -> mx.array:
        """table[w] (B, H, T, n) without the norm."""
        return self.table[windows(unpack(enc["codes"], self.bits, self.n), self.bits)]

    def mse_values(self, enc: dict) -> mx.array:
        return self._unit(enc) * enc["norm"].astype(mx.float32)[..., None]

    decode = mse_values

    def scores(self, q: mx.array, enc: dict) -> mx.array:
        return (q @ mx.swapaxes(self._unit(enc), -1, -2)) * enc["norm"].astype(mx.float32)[..., None, :]

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        return (p * enc["norm"].astype(mx.float32)[..., None, :]) @ self._unit(enc)


def train_table(bits: int, n: int = 64, vectors: int = 4000, iters: int = 8, seed: int = 0) -> np.ndarray:
    """Lloyd iterations of the table on N(0, 1) vectors of size n (free-start Viterbi assignments):
    float32 (2**L,).  Starts from N(0, 1) quantiles in a random order."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    size = 1 << window_bits(bits)
    tbl = stats.norm.ppf((np.arange(size) + 0.5) / size)[rng.permutation(size)].astype(np.float32)
    x = rng.standard_normal((vectors, n)).astype(np.float32)
    for _ in range(iters):
        w = np.array(viterbi(mx.array(x), bits, mx.array(tbl)))
        sums = np.bincount(w.ravel(), weights=x.ravel(), minlength=size)
        count = np.bincount(w.ravel(), minlength=size)
        tbl = np.where(count > 0, sums / np.maximum(count, 1), tbl).astype(np.float32)
    return tbl


if __name__ == "__main__":  # rebuild the shipped tables
    TABLES.mkdir(exist_ok=True)
    for b in [int(a) for a in sys.argv[1:]] or BITS:
        np.save(_table_path(b), train_table(b))
        print(f"wrote {_table_path(b)}")
