"""Build the codec for one of K or V of one layer from its CodecSpec.

Codecs that learn from data (the outlier split picks its channels, HQMQ its
outlier threshold) are built from the first keys or values the cache sees;
`calibration_state` returns what they learnt, so a reloaded cache rebuilds
the identical codec from `calib_state` without the original data.
"""

import math

import mlx.core as mx

from .calibration import channel_mean, outlier_channels, query_weights, query_whitening
from .config import CacheConfig, CodecSpec
from .fp16_codec import FP16
from .turboquant import TurboQuant




def split_sizes(bits: float, d: int):
    """Outlier split for fractional bits: ([n_hi, n_lo], [b_hi, b_lo]).

    n_hi = frac * d channels, rounded to a multiple of 16 (>= 16): 2.5 bits at d=128 is
    64 @ 3 + 64 @ 2.  (The paper's "32 @ 3 + 96 @ 2" is 2.25 bits, not 2.5.)
    """
    lo = math.floor(bits)
    frac = bits - lo
    n_hi = int(round(frac * d / 16.0)) * 16
    n_hi = min(max(n_hi, 16), d - 16)
    return [n_hi, d - n_hi], [lo + 1, lo]


def build_codec(spec: CodecSpec, cfg: CacheConfig, d: int, n_heads: int, layer: int, part: str,
                calib_x=None, calib_state=None, calib_q=None):
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
    calib_state = calib_state or {}
    mean = None
    if spec.center:
        mean = calib_state["mean"] if "mean" in calib_state else channel_mean(calib_x)
    weight = calib_state.get("weight")
    if weight is None and spec.query_weighting and calib_q is not None:
        fn = query_whitening if spec.query_weighting == "full" else query_weights
        weight = fn(calib_x, calib_q, mean)
    common = dict(qjl=spec.qjl, qjl_kind=spec.qjl_kind, norm_dtype=spec.norm_dtype,
                  norm_correction=spec.norm_correction, rotation=cfg.rotation, mean=mean, weight=weight,
                  grid=spec.grid,
                  seed=cfg.seed, layer=layer, part=part)
    bits = float(spec.bits)
    if bits == int(bits):
        return TurboQuant(d, n_heads, int(bits), **common)
    sizes, seg_bits = split_sizes(bits, d)
    perm = calib_state["perm"] if "perm" in calib_state else outlier_channels(calib_x - (0 if mean is None else mean[:, None]), sizes[0])
    return TurboQuant(d, n_heads, seg_bits, sizes, perm=perm, **common)


def calibration_state(codec) -> dict:
    """What a data-calibrated codec learnt (arrays), to store in the cache's state."""
    if isinstance(codec, TurboQuant):
        out = {} if codec.rotation.perm is None else {"perm": codec.rotation.perm}
        out = out if codec.mean is None else {**out, "mean": codec.mean}
        return out if codec.weight is None else {**out, "weight": codec.weight}
    return {"median": codec.median} if getattr(codec, "median", None) is not None else {}
