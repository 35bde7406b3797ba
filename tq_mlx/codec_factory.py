"""Build the codec for one of K or V of one layer from its CodecSpec.

Codecs that learn from data (the outlier split picks its channels, HQMQ its
outlier threshold) are built from the first keys or values the cache sees;
`calibration_state` returns what they learnt, so a reloaded cache rebuilds
the identical codec from `calib_state` without the original data.
"""

import math

import mlx.core as mx

from .config import CacheConfig, CodecSpec
from .turboquant import TurboQuant


class Float16Codec:
    """Passthrough: tokens kept as float16 in the original domain (the "fp16" preset and the fp16 window)."""

    side_nbytes = 0
    bits_per_element = 16.0

    def encode(self, x: mx.array, what: str = "input") -> dict:
        return {"x": x.astype(mx.float16)}

    def decode(self, enc: dict) -> mx.array:
        return enc["x"].astype(mx.float32)

    def rotate_query(self, q):
        return q.astype(mx.float32)

    def unrotate(self, acc):
        return acc

    def scores(self, q: mx.array, enc: dict) -> mx.array:
        return q @ mx.swapaxes(enc["x"].astype(mx.float32), -1, -2)

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        return p @ enc["x"].astype(mx.float32)


FP16 = Float16Codec()


def split_sizes(bits: float, d: int):
    """Outlier split for fractional bits: ([n_hi, n_lo], [b_hi, b_lo]).

    The paper's 2.5-bit setting is 32 outlier channels at 3 bits + 96 at 2;
    in general n_hi = round(frac * d) rounded to a multiple of 16 (>= 16).
    """
    lo = math.floor(bits)
    frac = bits - lo
    n_hi = int(round(frac * d / 16.0)) * 16
    n_hi = min(max(n_hi, 16), d - 16)
    return [n_hi, d - n_hi], [lo + 1, lo]


def outlier_channels(x: mx.array, n_hi: int) -> mx.array:
    """Per-head channel order, outliers first: x (B, H, T, d) -> int32 (H, d).

    Outliers are the n_hi channels with the largest mean square over the data seen.
    """
    energy = mx.mean(x.astype(mx.float32) ** 2, axis=(0, 2))  # (H, d)
    return mx.argsort(-energy, axis=-1).astype(mx.int32)


def build_codec(spec: CodecSpec, cfg: CacheConfig, d: int, n_heads: int, layer: int, part: str,
                calib_x=None, calib_state=None):
    """The codec object for (layer, part)."""
    if spec.codec == "fp16":
        return FP16
    if spec.codec == "hqmq":
        from .hqmq import HQMQ

        codec = HQMQ(d, n_heads, config=spec.hqmq, seed=cfg.seed, layer=layer, part=part,
                     norm_dtype=spec.norm_dtype)
        if calib_state:
            codec.median = calib_state["median"]
        return codec
    common = dict(qjl=spec.qjl, qjl_kind=spec.qjl_kind, norm_dtype=spec.norm_dtype,
                  norm_correction=spec.norm_correction, rotation=cfg.rotation,
                  seed=cfg.seed, layer=layer, part=part)
    bits = float(spec.bits)
    if bits == int(bits):
        return TurboQuant(d, n_heads, int(bits), **common)
    sizes, seg_bits = split_sizes(bits, d)
    perm = calib_state["perm"] if calib_state else outlier_channels(calib_x, sizes[0])
    return TurboQuant(d, n_heads, seg_bits, sizes, perm=perm, **common)


def calibration_state(codec) -> dict:
    """What a data-calibrated codec learnt (arrays), to store in the cache's state."""
    if isinstance(codec, TurboQuant):
        return {} if codec.rotation.perm is None else {"perm": codec.rotation.perm}
    return {"median": codec.median} if getattr(codec, "median", None) is not None else {}
