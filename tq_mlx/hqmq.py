"""HQMQ: Hurwitz quaternion multiplicative quantization of (B, H, T, d) vectors.

Field notes, section 2.  Each head vector is cut into C = d/4 chunks, each a
quaternion (w, x, y, z).  A chunk is stored gain-shape:

- its radius r as a b_r-bit uniform code against the token's max chunk radius
  m (levels k * m / (2**b_r - 1), so 0 and m are exact; m is held in fp16);
- its direction as the nearest of the 24*S codewords {h * q_s} by inner
  product: h one of the 24 Hurwitz units, q_s one of S Haar-random unit
  quaternions per (layer, head, K or V).  Index = unit * S + s.

Med3x outliers: a chunk whose norm exceeds 3x the median chunk norm of its
head is kept in fp16 instead.  The median is taken from the first data the
codec encodes (or from `calibrate(x)`) and then kept fixed; it is exposed as
`median` (float32 (H,)) and can be passed back to the constructor to restore
a saved codec.  Every stored array has leading dims (B, H, T), so outliers use
a fixed budget of `max_outliers` slots per token (largest first; any beyond the
budget are quantized normally).  A kept chunk gets radius code 0, so it adds
nothing to the quantized part and its slot adds its fp16 value.

Encoded dict (all leading dims (B, H, T)):
  `codes` uint32 (.., packed_words(W C, 1))  per chunk one W-bit code, index + (radius code << index bits),
          W = ceil(log2(24 S)) + b_r, stored as W bit planes of C chunks (bit j of chunk c is stream
          bit j C + c), so only the last word of a token is ever partly empty, whatever C is
  `scale` norm_dtype (..)   per-token max radius
  `oidx`  uint8 (.., K)     chunk index of each outlier slot, 255 = empty
  `oval`  float16 (.., 4 K) the slots' chunk values, 0 where empty
HQMQ has no rotation: `rotate_query` and `unrotate` only cast to float32.
"""

import math

import mlx.core as mx
import numpy as np

from .codec import NORM_DTYPES, check_input
from .packing import pack, packed_words, unpack
from .rotation import derive_seed

CONFIGS = {"s6_r2": (6, 2), "s24_r3": (24, 3), "s96_r4": (96, 4), "s192_r6": (192, 6)}
MIN_DIM, MAX_DIM = 4, 1020  # d/4 chunks must fit a uint8 slot index below the empty mark
EMPTY = 255
OUTLIER_FACTOR = 3.0
_ROWS_PER_BLOCK = 1 << 20  # bound on (rows x 4 S) floats live at once during the codeword search


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of quaternions (..., 4) in (w, x, y, z) order."""
    w1, x1, y1, z1 = np.moveaxis(a, -1, 0)
    w2, x2, y2, z2 = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ],
        axis=-1,
    )


def hurwitz_units() -> np.ndarray:
    """The 24 Hurwitz units, float64 (24, 4).

    Rows 0..7 are +-e_i (row 2 i + neg); rows 8..23 are (+-1, +-1, +-1, +-1)/2
    with component j negative when bit j of (row - 8) is set.
    """
    axes = np.zeros((8, 4))
    axes[np.arange(8), np.arange(8) // 2] = np.where(np.arange(8) % 2, -1.0, 1.0)
    bits = (np.arange(16)[:, None] >> np.arange(4)) & 1
    return np.concatenate([axes, 0.5 - bits])


def _check_config(d, n_heads, config, norm_dtype, max_outliers):
    if config not in CONFIGS:
        raise ValueError(f"unknown HQMQ config {config!r}; allowed: {sorted(CONFIGS)}")
    if not (isinstance(d, (int, np.integer)) and MIN_DIM <= d <= MAX_DIM and d % 4 == 0):
        raise ValueError(f"HQMQ needs d a multiple of 4 in {MIN_DIM}..{MAX_DIM} (quaternion chunks), got d={d!r}")
    if not (isinstance(n_heads, (int, np.integer)) and n_heads >= 1):
        raise ValueError(f"n_heads must be a positive integer, got {n_heads!r}")
    if norm_dtype not in NORM_DTYPES:
        raise ValueError(f"norm_dtype {norm_dtype!r} unsupported; allowed: {list(NORM_DTYPES)}")
    if not (isinstance(max_outliers, (int, np.integer)) and 0 <= max_outliers <= d // 4):
        raise ValueError(f"max_outliers must be an integer in 0..{d // 4}, got {max_outliers!r}")


class HQMQ:
    """HQMQ codec (the `codec.Codec` interface); see the module docstring.

    config: one of CONFIGS ("s{S}_r{b_r}").  median: float32 (H,) from a
    previous codec's `median`, or None to take it from the first encode.
    head_offset: the global index of head 0 (a tensor-parallel rank's heads); seeds use global indices.
    """

    encode_block = 1

    def __init__(
        self,
        d,
        n_heads,
        config="s96_r4",
        *,
        seed=0,
        layer=0,
        part="k",
        norm_dtype="float16",
        max_outliers=2,
        median=None,
        head_offset=0,
    ):
        _check_config(d, n_heads, config, norm_dtype, max_outliers)
        self.d, self.n_heads, self.config = int(d), int(n_heads), config
        self.S, self.radius_bits = CONFIGS[config]
        self.chunks = self.d // 4
        self.n_codewords = 24 * self.S
        self.index_bits = math.ceil(math.log2(self.n_codewords))
        self.code_bits = self.index_bits + self.radius_bits
        self._planes = mx.arange(self.code_bits, dtype=mx.uint32)[:, None]
        self.max_outliers = int(max_outliers)
        self.norm_dtype = NORM_DTYPES[norm_dtype]
        q = []
        for h in range(head_offset, head_offset + n_heads):  # Haar on S^3: a normalised Gaussian 4-vector
            g = np.random.default_rng(derive_seed(seed, layer, h, part)).standard_normal((self.S, 4))
            q.append(g / np.linalg.norm(g, axis=-1, keepdims=True))
        q = np.stack(q)  # (H, S, 4)
        units = hurwitz_units()
        words = quat_mul(units[None, :, None, :], q[:, None, :, :])  # (H, 24, S, 4)
        # right multiplication by conj(q_s) as a matrix: <a, h q_s> = <a conj(q_s), h>
        conj = q * np.array([1.0, -1.0, -1.0, -1.0])
        right = quat_mul(np.eye(4)[None, :, None, :], conj[:, None, :, :])  # (H, 4 [a], S, 4 [component])
        right = np.swapaxes(right, -1, -2)  # component-major, so the search reduces over contiguous slices
        self.quaternions = mx.array(q.astype(np.float32))
        self.codewords = mx.array(words.reshape(n_heads * self.n_codewords, 4).astype(np.float32))
        self._right = mx.array(right.reshape(n_heads, 4, 4 * self.S).astype(np.float32))
        self.median = median

    @property
    def median(self):
        """Each head's median chunk norm, float32 (H,), the outlier threshold / 3; None before calibration.
        (B, H) for batch rows with calibrations of their own (a batch cache)."""
        return self._median

    @median.setter
    def median(self, value):
        if value is not None:
            value = mx.array(value, dtype=mx.float32)
            if value.ndim > 1:
                value = value.reshape(-1, value.shape[-1])
            if value.ndim == 0 or value.shape[-1] != self.n_heads:
                raise ValueError(f"median must have shape ({self.n_heads},) or (B, {self.n_heads}), got {value.shape}")
        self._median = value

    @property
    def side_nbytes(self) -> int:
        """Bytes of per-head constants held: the S quaternions, the 24 S codeword table, the search matrices."""
        extra = 0 if self.median is None else self.median.nbytes
        return self.quaternions.nbytes + self.codewords.nbytes + self._right.nbytes + extra

    def _scale_bits(self) -> int:
        return 16 if self.norm_dtype == mx.float16 else 32

    @property
    def bits_per_element(self) -> float:
        """The paper's count, (log2(24 S) + b_r)/4 + 16/d, plus the outlier slots as stored (8 + 64 bits each)."""
        slots = self.max_outliers * (8 + 64)
        return (math.log2(self.n_codewords) + self.radius_bits) / 4 + (self._scale_bits() + slots) / self.d

    @property
    def stored_bits_per_element(self) -> float:
        """Bits per element really stored: whole uint32 words of codes, the scale and the outlier slots."""
        words = packed_words(self.chunks * self.code_bits, 1)
        return (32 * words + self._scale_bits() + self.max_outliers * (8 + 64)) / self.d

    def _chunk_norms(self, x):
        xc = x.astype(mx.float32).reshape(*x.shape[:3], self.chunks, 4)
        return xc, mx.linalg.norm(xc, axis=-1)

    def calibrate(self, x: mx.array) -> mx.array:
        """Set `median` (float32 (H,)) to each head's median chunk norm over x (B, H, T, d); returns it."""
        check_input(x, self.d, "calibration input", self.n_heads)
        _, r = self._chunk_norms(x)
        flat = mx.sort(mx.swapaxes(r, 0, 1).reshape(self.n_heads, -1), axis=-1)
        n = flat.shape[-1]
        self.median = (flat[:, (n - 1) // 2] + flat[:, n // 2]) / 2
        return self.median

    def _nearest(self, u: mx.array) -> mx.array:
        """Index of the nearest codeword to unit chunks u (B, H, N, 4): uint32 (B, H, N).

        For each s, z = u * conj(q_s); the best Hurwitz unit for z scores
        max(max_i |z_i|, sum_i |z_i| / 2) (an axis unit or a half unit).
        """
        z = (u @ self._right).reshape(*u.shape[:3], 4, self.S)
        a = mx.abs(z)
        s = mx.argmax(mx.maximum(a.max(axis=-2), a.sum(axis=-2) / 2), axis=-1)  # (B, H, N)
        zs = mx.take_along_axis(z, s[..., None, None], axis=-1).squeeze(-1)  # (B, H, N, 4)
        neg = (zs < 0).astype(mx.uint32)
        za = mx.abs(zs)
        i = mx.argmax(za, axis=-1).astype(mx.uint32)
        axis_unit = 2 * i + mx.take_along_axis(neg, i[..., None], axis=-1).squeeze(-1)
        half_unit = 8 + (neg << mx.arange(4, dtype=mx.uint32)).sum(axis=-1).astype(mx.uint32)
        unit = mx.where(za.max(axis=-1) >= za.sum(axis=-1) / 2, axis_unit, half_unit)
        return unit * self.S + s.astype(mx.uint32)

    def _directions(self, xc, r):
        b, h, t, c, _ = xc.shape
        u = (xc / mx.maximum(r, 1e-30)[..., None]).reshape(b, h, t * c, 4)
        step = max(1, _ROWS_PER_BLOCK // (b * h * 4 * self.S))
        if t * c <= step:
            return self._nearest(u).reshape(b, h, t, c)
        parts = []
        for i in range(0, t * c, step):
            parts.append(self._nearest(u[:, :, i : i + step]))
            mx.eval(parts[-1])
        return mx.concatenate(parts, axis=-1).reshape(b, h, t, c)

    def _outliers(self, xc, r):
        """Slots for the largest chunks above 3x the median.

        Returns oidx (.., K) uint8, oval (.., 4K) fp16 and the kept mask (.., C)."""
        k = self.max_outliers
        cand = r > OUTLIER_FACTOR * self.median.reshape(-1, self.n_heads, 1, 1)
        order = mx.argsort(mx.where(cand, -r, 1.0), axis=-1)[..., :k]
        valid = mx.take_along_axis(cand, order, axis=-1)
        oidx = mx.where(valid, order, EMPTY).astype(mx.uint8)
        vals = mx.take_along_axis(xc, order[..., None], axis=-2)
        oval = mx.where(valid[..., None], vals, 0.0).astype(mx.float16)
        kept = (oidx[..., None] == mx.arange(self.chunks)).any(axis=-2)
        return oidx, oval.reshape(*oval.shape[:3], 4 * k), kept

    def encode(self, x: mx.array) -> dict:
        """Codes for x (B, H, T, d): a dict of arrays with leading dims (B, H, T)."""
        xc, r = self._chunk_norms(x)
        enc = {}
        kept = None
        if self.max_outliers:
            if self.median is None:
                self.calibrate(x)
            enc["oidx"], enc["oval"], kept = self._outliers(xc, r)
        top = r if kept is None else mx.where(kept, 0.0, r)
        enc["scale"] = top.max(axis=-1).astype(self.norm_dtype)
        levels = (1 << self.radius_bits) - 1
        scale = enc["scale"].astype(mx.float32)[..., None]
        rcode = mx.clip(mx.round(r / mx.maximum(scale, 1e-30) * levels), 0, levels)
        rcode = mx.where(scale > 0, rcode, 0)
        if kept is not None:
            rcode = mx.where(kept, 0, rcode)
        code = self._directions(xc, r) | (rcode.astype(mx.uint32) << self.index_bits)
        planes = (code[..., None, :] >> self._planes) & 1  # (B, H, T, W, C)
        enc["codes"] = pack(planes.reshape(*code.shape[:3], -1), 1)
        return enc

    def unpack_codes(self, enc: dict):
        """(codeword index, radius code), each uint32 (B, H, T, C), from `enc["codes"]`."""
        bits = unpack(enc["codes"], 1, self.code_bits * self.chunks)
        bits = bits.reshape(*bits.shape[:3], self.code_bits, self.chunks)
        code = (bits << self._planes).sum(axis=-2).astype(mx.uint32)
        return code & ((1 << self.index_bits) - 1), code >> self.index_bits

    def decode(self, enc: dict) -> mx.array:
        """x~ (B, H, T, d) float32."""
        idx, rcode = self.unpack_codes(enc)
        b, h, t, c = idx.shape
        flat = idx + (mx.arange(h, dtype=mx.uint32) * self.n_codewords)[None, :, None, None]
        dirs = mx.take(self.codewords, flat.reshape(-1), axis=0).reshape(b, h, t, c, 4)
        levels = (1 << self.radius_bits) - 1
        rad = rcode.astype(mx.float32)
        rad = rad * (enc["scale"].astype(mx.float32) / levels)[..., None]
        out = dirs * rad[..., None]
        if "oidx" in enc:
            onehot = (enc["oidx"][..., None] == mx.arange(c)).astype(mx.float32)  # (B, H, T, K, C)
            oval = enc["oval"].astype(mx.float32).reshape(b, h, t, -1, 4)
            out = out + mx.swapaxes(onehot, -1, -2) @ oval
        return out.reshape(b, h, t, c * 4)

    mean_rot = None  # no centring

    def decode_stored(self, enc: dict) -> mx.array:
        return self.decode(enc)

    def rotate_query(self, q: mx.array) -> mx.array:
        """q (B, H, M, d) as float32 (HQMQ has no rotation)."""
        return q.astype(mx.float32)

    to_stored = rotate_query

    def constants(self) -> list:
        """Every array the codec holds."""
        out = [self.quaternions, self.codewords, self._right, self._planes]
        return out if self.median is None else [*out, self.median]

    def calibration_state(self) -> dict:
        return {} if self.median is None else {"median": self.median}

    def kernel_reason(self):
        return "HQMQ has no Metal kernel"

    def unrotate(self, acc: mx.array) -> mx.array:
        return acc

    def scores(self, q: mx.array, enc: dict) -> mx.array:
        """<q, x~_t>: q (B, H, M, d) -> (B, H, M, T) float32."""
        return q.astype(mx.float32) @ mx.swapaxes(self.decode(enc), -1, -2)

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        """sum_t p_t x~_t: p (B, H, M, T) -> (B, H, M, d) float32."""
        return p.astype(mx.float32) @ self.decode(enc)
