"""TurboQuant codecs on head-batched vectors x of shape (B, H, T, d).

One `TurboQuant` covers TurboQuant_mse, TurboQuant_prod (QJL) and the
fractional-bit outlier split.  The rotated domain is y = R x with R a
HeadRotation; it is cut into segments (one for plain TurboQuant, two for the
outlier split), each with its own norm and Lloyd-Max codebook for its size:

    y_s ~ n_s * c_s[idx_s]            (mse, bits_s, or bits_s - 1 with QJL)
        + a_s * g_s * S_s^T sign(S_s r_s)   (QJL, r_s = y_s - mse part, g_s = |r_s|)

Encoded tensors are a dict of arrays whose leading dims are (B, H, T):
`codes{s}` uint32 (.., words), `norm{s}` (..), and with QJL `signs{s}` uint32
and `rnorm{s}` (..).  Attention works on the codes in the rotated domain via
`scores` and `accumulate`; `decode` is for tests and benchmarks.
"""

import math

import mlx.core as mx
import numpy as np

from . import codebook as cbk
from . import kernels
from .affine_segment import AffineSegment
from .codec import NORM_DTYPES
from .packing import pack, packed_words, unpack
from .rope_mean import kernel_pairs, tables
from .rotation import HeadRotation, derive_seed, rotation_matrix
from .trellis import ENCODE_BLOCK, TrellisSegment

GRIDS = ("lloyd-max", "uniform", "trellis")
QJL_KINDS = ("gaussian", "orthogonal")


_ZEROS = {}  # (rows, d) -> zeros: the kernels' mean rows for codecs without a static mean, one per shape


def _zeros(rows: int, d: int) -> mx.array:
    if (rows, d) not in _ZEROS:
        _ZEROS[rows, d] = mx.zeros((rows, d))
    return _ZEROS[rows, d]


def quantize_levels(u: mx.array, edges: mx.array, bits: int) -> mx.array:
    """Index of the nearest level for u (..., n) given sorted decision edges (2**bits - 1,): uint32."""
    if bits <= 4:
        return (u[..., None] > edges).sum(axis=-1).astype(mx.uint32)
    idx = mx.zeros(u.shape, dtype=mx.uint32)  # binary search over the sorted edges
    for j in reversed(range(bits)):
        cand = idx + (1 << j)
        thr = mx.take(edges, (cand - 1).astype(mx.int32))
        idx = mx.where(u > thr, cand, idx)
    return idx


def _sign_pm(words: mx.array, n: int) -> mx.array:
    return unpack(words, 1, n).astype(mx.float32) * 2.0 - 1.0


class Segment:
    """One TurboQuant instance over `n` rotated coordinates: mse at `mse_bits` (0 = none) plus optional QJL."""

    window = 0  # codes index the codebook directly (trellis codes: their window bits)

    def __init__(self, n, bits, qjl, qjl_kind, qjl_seeds, norm_correction):
        self.n, self.bits, self.qjl = n, bits, qjl
        self.mse_bits = bits - 1 if qjl else bits
        self.norm_correction = norm_correction
        if self.mse_bits:
            levels = cbk.codebook(n, self.mse_bits)
            self.levels = mx.array(levels)
            self.edges = mx.array(cbk.boundaries(levels))
        if qjl:
            if qjl_kind == "gaussian":
                s = np.stack([np.random.default_rng(sd).standard_normal((n, n)) for sd in qjl_seeds])
                self.S = mx.array(s.astype(np.float32))  # (H, n, n)
                self.qjl_scale = math.sqrt(math.pi / 2) / n
            else:
                self.S = mx.array(np.stack([rotation_matrix(n, sd, "haar") for sd in qjl_seeds]))
                # rows uniform on the sphere: 1 / (n E|t|), exact at finite n (sqrt(pi/2)/sqrt(n) is its limit)
                self.qjl_scale = math.sqrt(math.pi) * math.exp(math.lgamma((n + 1) / 2) - math.lgamma(n / 2)) / n

    @property
    def side_nbytes(self) -> int:
        return self.S.nbytes if self.qjl else 0

    def stored_bits(self, norm_bits: int) -> float:
        """Bits per coordinate actually stored, norms included."""
        words = packed_words(self.n, self.mse_bits) if self.mse_bits else 0
        words += packed_words(self.n, 1) if self.qjl else 0
        return (32 * words + norm_bits * (1 + self.qjl)) / self.n

    def encode(self, y: mx.array, norm_dtype) -> dict:
        norm = mx.linalg.norm(y, axis=-1)
        u = y / mx.maximum(norm, 1e-30)[..., None]
        out = {}
        mse = mx.zeros_like(y)
        if self.mse_bits:
            idx = quantize_levels(u, self.edges, self.mse_bits)
            c = self.levels[idx]
            scale = norm
            if self.norm_correction:
                scale = norm / mx.maximum(mx.linalg.norm(c, axis=-1), 1e-30)
            out["codes"] = pack(idx, self.mse_bits)
            out["norm"] = scale.astype(norm_dtype)
            mse = c * out["norm"].astype(mx.float32)[..., None]
        if self.qjl:
            r = y - mse
            proj = r @ mx.swapaxes(self.S, -1, -2)  # S r, per head
            out["signs"] = pack((proj >= 0).astype(mx.uint32), 1)
            out["rnorm"] = mx.linalg.norm(r, axis=-1).astype(norm_dtype)
        return out

    def mse_values(self, enc: dict) -> mx.array:
        """n_s * c[idx] for every stored vector: float32 (B, H, T, n)."""
        c = self.levels[unpack(enc["codes"], self.mse_bits, self.n)]
        return c * enc["norm"].astype(mx.float32)[..., None]

    def decode(self, enc: dict) -> mx.array:
        out = self.mse_values(enc) if self.mse_bits else 0.0
        if self.qjl:
            g = enc["rnorm"].astype(mx.float32)[..., None] * self.qjl_scale
            out = out + g * (_sign_pm(enc["signs"], self.n) @ self.S)
        return out

    def scores(self, q: mx.array, enc: dict) -> mx.array:
        """<q, y~> for q (B, H, M, n) against every stored vector: (B, H, M, T) float32."""
        s = 0.0
        if self.mse_bits:
            c = self.levels[unpack(enc["codes"], self.mse_bits, self.n)]
            s = (q @ mx.swapaxes(c, -1, -2)) * enc["norm"].astype(mx.float32)[..., None, :]
        if self.qjl:
            sq = q @ mx.swapaxes(self.S, -1, -2)
            g = enc["rnorm"].astype(mx.float32)[..., None, :] * self.qjl_scale
            s = s + (sq @ mx.swapaxes(_sign_pm(enc["signs"], self.n), -1, -2)) * g
        return s

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        """sum_t p_t y~_t for p (B, H, M, T): (B, H, M, n) float32."""
        acc = 0.0
        if self.mse_bits:
            c = self.levels[unpack(enc["codes"], self.mse_bits, self.n)]
            acc = (p * enc["norm"].astype(mx.float32)[..., None, :]) @ c
        if self.qjl:
            g = enc["rnorm"].astype(mx.float32)[..., None, :] * self.qjl_scale
            acc = acc + ((p * g) @ _sign_pm(enc["signs"], self.n)) @ self.S
        return acc


class TurboQuant:
    """TurboQuant for (B, H, T, d) vectors, one rotation per head (the `codec.Codec` interface).

    bits: one int per segment; sizes: the segment sizes (sum d).  With `perm`
    (int32 (H, d)) the first sizes[0] permuted channels form the first segment
    (the outlier split); otherwise the segments cut the rotated vector.
    mean: optional float32 (H, d) subtracted before encoding and added back
    exactly in scores/accumulate (attention weights sum to 1), so centring
    changes no result except the quantization error.
    weight: optional float32 (H, d) channel weights w, or (H, d, d) matrices
    A: w * (x - mean) (or A (x - mean)) is encoded and queries are divided by
    w (or mapped by A^-T), so <q, x> is unchanged while the quantization noise
    is shaped away from the directions queries use most.
    batch: mean, weight and perm carry a leading batch axis, (B, H, d) and (B, H, d, d): batch rows
    with calibrations of their own (a batch cache); row b of every input is coded with row b's.
    grid: "lloyd-max" (the TurboQuant codebooks), "uniform" (MLX's affine
    format on the rotated vectors, so attention uses MLX's quantized kernels)
    or "trellis" (trellis-coded: the same bits, lower error; trellis.py).
    head_offset: the global index of head 0 (a tensor-parallel rank holds heads
    head_offset .. head_offset + n_heads - 1): every per-head seed derives from the global index.
    use_kernels: encode through the tq_encode (tq_viterbi for trellis codes) Metal kernel where it applies.
    rope: optional (RopeMap, mu ((B,) H, d), block): RoPE-aware centring of keys (rope_mean.py) instead of `mean`,
    the mean turned to the centre of each block of `block` positions; the codes then depend on positions,
    so only `rope_mean.at(codec, start)` encodes and reads them.
    Research options (not in CodecSpec): qjl_kind, norm_dtype, norm_correction.
    """

    def __init__(
        self,
        d,
        n_heads,
        bits,
        sizes=None,
        *,
        qjl=False,
        qjl_kind="orthogonal",
        norm_dtype="float16",
        norm_correction=True,
        rotation="auto",
        perm=None,
        mean=None,
        weight=None,
        grid="lloyd-max",
        seed=0,
        layer=0,
        part="k",
        head_offset=0,
        use_kernels=False,
        batch=False,
        rope=None,
    ):
        sizes = [d] if sizes is None else list(sizes)
        bits = [bits] if isinstance(bits, int) else list(bits)
        if sum(sizes) != d or len(sizes) != len(bits):
            raise ValueError(f"segment sizes {sizes} must sum to d={d} and match bits {bits}")
        if norm_dtype not in NORM_DTYPES:
            raise ValueError(f"norm_dtype {norm_dtype!r} unsupported; allowed: {list(NORM_DTYPES)}")
        if qjl_kind not in QJL_KINDS:
            raise ValueError(f"qjl_kind {qjl_kind!r} unsupported; allowed: {QJL_KINDS}")
        for n, b in zip(sizes, bits):
            cbk._check(n, b if not qjl or b > 1 else 1)
        self.d, self.n_heads, self.bits, self.sizes = d, n_heads, bits, sizes
        self.norm_dtype = NORM_DTYPES[norm_dtype]
        heads = range(head_offset, head_offset + n_heads)  # global head indices: a tensor-parallel rank's slice
        seeds = [[derive_seed(seed, layer, h, part, s) for s in range(len(sizes))] for h in heads]
        blocks = sizes if perm is not None else [d]
        self.rotation = HeadRotation(blocks, seeds, rotation, perm)
        if grid not in GRIDS:
            raise ValueError(f"grid {grid!r} unsupported; allowed: {GRIDS}")
        if grid != "lloyd-max" and qjl:
            raise ValueError(f"the {grid} grid has no QJL variant")
        if grid == "uniform":
            self.segments = [AffineSegment(n, b) for n, b in zip(sizes, bits)]
        elif grid == "trellis":
            self.segments = [TrellisSegment(n, b, norm_correction) for n, b in zip(sizes, bits)]
        else:
            self.segments = [
                Segment(
                    n,
                    b,
                    qjl,
                    qjl_kind,
                    [derive_seed(seed, layer, h, part, 100 + i) for h in heads],
                    norm_correction,
                )
                for i, (n, b) in enumerate(zip(sizes, bits))
            ]
        self._cuts = np.cumsum(sizes)[:-1].tolist()
        self.encode_block = ENCODE_BLOCK if grid == "trellis" else 1
        self.mean = None if mean is None else mx.array(mean).astype(mx.float32)
        if rope is not None and mean is not None:
            raise ValueError("RoPE-aware centring replaces the static mean")
        # RoPE-centred keys: the mean on the host (`rope_mu`, float32: decode steps turn it there, with no sync)
        # and in pairs on the device (what the kernels and the reference path read)
        self.rope_map, self.rope_block = (None, 1) if rope is None else (rope[0], int(rope[2]))
        self.rope_mu = None if rope is None else np.array(rope[1])
        self._pairs = None if rope is None else kernel_pairs(self.rope_map, rope[1])
        self.weight = None if weight is None else mx.array(weight).astype(mx.float32)
        self.full_weight = self.weight is not None and self.weight.ndim == 3 + bool(batch)
        self._winv = None
        if self.full_weight:
            self._winv = mx.array(np.linalg.inv(np.array(self.weight, dtype=np.float64)).astype(np.float32))
        self.mean_rot = None if mean is None else self.to_stored(self._per_head(self.mean))
        self.kernel_encode = use_kernels and self.kernel_encodes()  # the caller decides
        self._maps = {}
        # the kernels' constant rows: one per head, or per (batch row, head) when a constant has a batch axis
        rows = [a.shape[0] for a in (mean, weight, perm, self.rope_mu) if batch and a is not None]
        self.kernel_rows = n_heads * max(rows, default=1)
        zeros = _zeros(self.kernel_rows, d)
        # what tq_encode subtracts and the decode adds back: (kernel_rows, d)
        self.kernel_mean = zeros if mean is None else self._rows(self.mean)
        self.kernel_mean_rot = zeros if mean is None else self._rows(self.mean_rot)

    @property
    def rope_mean(self):
        """RoPE-centred keys: the pre-RoPE mean ((B,) H, d) as an array (made from the host copy), else None."""
        return None if self.rope_mu is None else mx.array(self.rope_mu)

    def _rows(self, a: mx.array, trailing: int = 1) -> mx.array:
        """A per-head constant ((B,) H, ..., *tail) with `trailing` tail dims as (kernel_rows, *tail) (row
        b*H + h), repeated over the batch rows when it has no batch axis."""
        tail = a.shape[a.ndim - trailing :]
        a = a.reshape(-1, *tail)
        if a.shape[0] != self.kernel_rows:
            a = mx.broadcast_to(a[None], (self.kernel_rows // a.shape[0], *a.shape)).reshape(-1, *tail)
        return a

    def _per_head(self, a: mx.array) -> mx.array:
        """A per-head constant (H, d) or (B, H, d) as (1 or B, H, 1, d), to broadcast against (B, H, T, d)."""
        return a.reshape(-1, self.n_heads, 1, a.shape[-1])

    def _matrices(self, a: mx.array) -> mx.array:
        """Per-head matrices (H, d, d) or (B, H, d, d) as (1 or B, H, d, d)."""
        return a.reshape(-1, self.n_heads, self.d, self.d)

    @property
    def side_nbytes(self) -> int:
        """Bytes of this codec's own constants (rotation signs or matrices, means, weights, QJL matrices, the
        RoPE-centred mean on the host and in pairs); those shared with other layers are `shared_constants`."""
        extra = 0 if self.mean is None else self.mean.nbytes + self.mean_rot.nbytes
        extra += 0 if self.weight is None else self.weight.nbytes * (1 + (self._winv is not None))
        if self.rope_mu is not None:
            extra += self.rope_mu.nbytes + (0 if self._pairs is None else self._pairs[0].nbytes)
        return extra + self.rotation.nbytes + sum(s.side_nbytes for s in self.segments)

    def shared_constants(self) -> list:
        """Constants held once for every layer alike (arrays, device or host): the RoPE map and its tables, and
        the zero rows the kernels read for a mean this codec does not have."""
        if self.rope_map is None:
            return []
        return [*self.rope_map, *tables(self.rope_map).arrays(), self.kernel_mean]

    @property
    def bits_per_element(self) -> float:
        nb = 16 if self.norm_dtype == mx.float16 else 32
        return sum(s.stored_bits(nb) * s.n for s in self.segments) / self.d

    def constants(self) -> list:
        """Every array the codec holds."""
        out = [a for a in (self.mean, self.mean_rot, self.weight, self._winv) if a is not None]
        if self.rope_map is not None:
            out += [*self.rope_map, *(self._pairs or ()), *(tables(self.rope_map).pairs or ())]
        out += [self.kernel_mean, self.kernel_mean_rot]
        out += [data for _, data in self.rotation.blocks]
        out += [a for a in (self.rotation.perm, self.rotation.inv_perm) if a is not None]
        for s in self.segments:
            out += [getattr(s, n) for n in ("levels", "edges", "S") if hasattr(s, n)]
        return out

    def calibration_state(self) -> dict:
        out = {} if self.rotation.perm is None else {"perm": self.rotation.perm}
        out = out if self.mean is None else {**out, "mean": self.mean}
        if self.rope_mu is not None:
            out.update({"rope_mean": self.rope_mean, **{f"rope_{k}": v for k, v in self.rope_map.state().items()}})
            out["rope_block"] = mx.array(self.rope_block, mx.int32)
        return out if self.weight is None else {**out, "weight": self.weight}

    # ---- what the Metal kernels read ---------------------------------------
    def kernel_reason(self):
        """None when the kernels read these codes (one Lloyd-Max or trellis segment, no QJL, 1..8 bits,
        d in kernels.SUPPORTED_D), else a short reason."""
        if len(self.segments) != 1:
            return f"{len(self.segments)} segments (outlier split)"
        seg = self.segments[0]
        if isinstance(seg, AffineSegment):
            return "the uniform grid (MLX's quantized kernels serve it)"
        if seg.qjl:
            return "QJL"
        if self.rope_map is not None and self.rope_block == 1:
            return "RoPE-centred keys turned to every position (saved before blocks; the kernels add a term per block)"
        if self.rope_map is not None and self.kernel_pairs() is None:
            return "RoPE-centred keys whose rotary map is not in pairs"
        if self.d not in kernels.SUPPORTED_D:
            return f"head_dim {self.d} not in {kernels.SUPPORTED_D}"
        return None

    def kernel_pairs(self):
        """RoPE-centred keys: the mean as tq_rope_bias reads it (rope_mean.kernel_pairs); else None."""
        return self._pairs

    def kernel_encodes(self) -> bool:
        """Whether a kernel writes these codes: tq_encode (Lloyd-Max) or tq_viterbi (trellis codes)."""
        if self.kernel_reason() is not None:
            return False
        seg = self.segments[0]
        return not seg.window or kernels.viterbi_supports(seg.n) is None

    @property
    def levels(self) -> mx.array:
        """The Lloyd-Max codebook (or trellis table) of the single segment, float32 (see kernel_reason)."""
        return self.segments[0].levels

    @property
    def kernel_format(self) -> tuple:
        """(code bits, trellis window bits or 0) of the single segment, as the kernels take them."""
        seg = self.segments[0]
        return seg.mse_bits, seg.window

    def kernel_map(self, which: str) -> mx.array:
        """The transform a kernel applies, float32: "encode" y = T(x - mean), "query" q' = T q (the stored
        domain), "output" x = T y (back).  A (H, D) vector a for a randomized Hadamard rotation with
        diagonal weights (T = a * H_u x for encode/query, a * H_u y for output, H_u the unnormalised
        Walsh-Hadamard transform), else a dense (H, D, D) matrix (T x = M x)."""
        if which not in self._maps:
            self._maps[which] = self._kernel_map(which)
            mx.eval(self._maps[which])
        return self._maps[which]

    def _kernel_map(self, which: str) -> mx.array:
        """(kernel_rows, d) or (kernel_rows, d, d): per head, or per batch row and head (row b*H + h)."""
        kind, data = self.rotation.blocks[0]
        if kind == "hadamard" and not self.full_weight and self.rotation.perm is None and self.d in kernels.HADAMARD_D:
            s = data[:, 0, :] / (self.d**0.5)
            w = mx.ones_like(s) if self.weight is None else self.weight
            return self._rows(s * w if which == "encode" else s / w)
        eye = mx.broadcast_to(mx.eye(self.d)[None, None], (1, self.n_heads, self.d, self.d))
        fn = {"encode": self.to_stored, "query": self.rotate_query, "output": self.unrotate}[which]
        return self._rows(mx.swapaxes(fn(eye), -1, -2), 2)

    # ---- the codec interface -------------------------------------------------
    def _split(self, y):
        return [y] if len(self.segments) == 1 else mx.split(y, self._cuts, axis=-1)

    def _join(self, parts):
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

    def encode(self, x: mx.array) -> dict:
        """Codes for x (B, H, T, d): a dict of arrays with leading dims (B, H, T)."""
        if self.rope_map is not None:
            raise ValueError("RoPE-centred codes depend on positions: encode through rope_mean.at(codec, start)")
        return self.encode_centred(x)

    def encode_centred(self, x: mx.array, mean: mx.array = None) -> dict:
        """encode, for x (B, H, T, d) whose position-dependent mean (if any) the caller has taken off, or
        gives as `mean` (H, d) to take off first."""
        if self.kernel_encode:
            seg, tmap = self.segments[0], self.kernel_map("encode")
            kmean = self.kernel_mean if mean is None else self._rows(mean)

            def run():
                if seg.window:  # trellis codes: the Viterbi search
                    return kernels.viterbi_encode(
                        x, kmean, tmap, seg.table, seg.bits, self.norm_dtype, seg.norm_correction
                    )
                return kernels.encode(x, kmean, tmap, seg.levels, seg.edges, self.norm_dtype, seg.norm_correction)

            kind = "viterbi" if seg.window else "encode"
            key = (kind, x.dtype, self.norm_dtype, self.d, seg.mse_bits, tmap.ndim, seg.norm_correction)
            out = kernels.guarded(key, run)
            if out is not None:
                return {"codes0": out[0], "norm0": out[1]}
            self.kernel_encode = False  # this instantiation failed: MLX ops from now on
        x = x.astype(mx.float32)
        for m in (self.mean, mean):
            x = x if m is None else x - self._per_head(m)
        y = self.to_stored(x)
        enc = {}
        for i, (seg, ys) in enumerate(zip(self.segments, self._split(y))):
            enc.update({f"{k}{i}": v for k, v in seg.encode(ys, self.norm_dtype).items()})
        return enc

    def _enc(self, enc, i):
        return {k[:-1]: v for k, v in enc.items() if k.endswith(str(i))}

    def decode_stored(self, enc: dict) -> mx.array:
        """y~ (B, H, T, d) float32 in the stored domain, centring mean included."""
        y = self._join([s.decode(self._enc(enc, i)) for i, s in enumerate(self.segments)])
        return y if self.mean_rot is None else y + self.mean_rot

    def decode(self, enc: dict) -> mx.array:
        """x~ (B, H, T, d) float32."""
        return self.unrotate(self.decode_stored(enc))

    def segment_values(self, enc: dict, i: int = 0) -> mx.array:
        """n * c[idx] of segment i, without the mean: float32 (B, H, T, n) (what the kernels compute)."""
        return self.segments[i].mse_values(self._enc(enc, i))

    def to_stored(self, x: mx.array) -> mx.array:
        """R (w * x) (or R A x) for x (B, H, T, d): float32."""
        x = x.astype(mx.float32)
        if self.full_weight:
            x = x @ mx.swapaxes(self._matrices(self.weight), -1, -2)
        elif self.weight is not None:
            x = x * self._per_head(self.weight)
        return self.rotation.forward(x)

    def rotate_query(self, q: mx.array) -> mx.array:
        """R (q / w) (or R A^-T q) for q (B, H, M, d) (queries grouped per KV head)."""
        q = q.astype(mx.float32)
        if self.weight is not None:
            q = q @ self._matrices(self._winv) if self.full_weight else q / self._per_head(self.weight)
        return self.rotation.forward(q)

    def unrotate_query(self, q_rot: mx.array) -> mx.array:
        """q back from rotate_query(q): (B, H, M, d) float32."""
        q = self.rotation.inverse(q_rot)
        if self.weight is None:
            return q
        return q @ self._matrices(self.weight) if self.full_weight else q * self._per_head(self.weight)

    def scores(self, q_rot: mx.array, enc: dict) -> mx.array:
        """<R q, y~_t>: q_rot (B, H, M, d) -> (B, H, M, T) float32."""
        parts = self._split(q_rot)
        s = sum(s.scores(qs, self._enc(enc, i)) for i, (s, qs) in enumerate(zip(self.segments, parts)))
        return s if self.mean_rot is None else s + q_rot @ mx.swapaxes(self.mean_rot, -1, -2)

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        """sum_t p_t y~_t in the rotated domain: p (B, H, M, T) -> (B, H, M, d)."""
        acc = self._join([s.accumulate(p, self._enc(enc, i)) for i, s in enumerate(self.segments)])
        return acc if self.mean_rot is None else acc + p.sum(axis=-1, keepdims=True) * self.mean_rot

    def unrotate(self, acc: mx.array) -> mx.array:
        """R^T acc / w: back to the original domain."""
        x = self.rotation.inverse(acc)
        if self.weight is None:
            return x
        if self.full_weight:
            return x @ mx.swapaxes(self._matrices(self._winv), -1, -2)
        return x / self._per_head(self.weight)
