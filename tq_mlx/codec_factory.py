"""Build the codec for one of K or V of one layer from its CodecSpec.

`CODECS` maps each `CodecSpec.codec` name to a `CodecKind`: how to build it and
whether building needs queries (query-weighted keys).  A new codec is one
module implementing `codec.Codec` plus one entry here.

Codecs that learn from data (centring means, query weights, the outlier
split's channel order, HQMQ's outlier threshold) are built from the first
keys or values (and queries) the cache sees; `Codec.calibration_state()`
returns what they learnt, and passing it back as `state` rebuilds the
identical codec without the original data (a reloaded cache).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from .calibration import channel_mean, outlier_channels, query_weights, query_whitening
from .config import CacheConfig, CodecSpec
from .fp16_codec import FP16
from .hqmq import HQMQ
from .rope_mean import BLOCK, RopeMap, fit_mean, rotate
from .turboquant import TurboQuant


def split_sizes(bits: float, d: int):
    """Outlier split for fractional bits: ([n_hi, n_lo], [b_hi, b_lo]).

    n_hi = frac * d channels, rounded to a multiple of 16 (>= 16): 2.5 bits at d=128 is
    64 @ 3 + 64 @ 2.  (The paper's "32 @ 3 + 96 @ 2" is 2.25 bits, not 2.5.)
    """
    lo = math.floor(bits)
    n_hi = int(round((bits - lo) * d / 16.0)) * 16
    n_hi = min(max(n_hi, 16), d - 16)
    return [n_hi, d - n_hi], [lo + 1, lo]


@dataclass(frozen=True)
class Calibration:
    """What a codec may learn from: the first vectors x (B, H, T, d) (positions 0 .. T-1), the queries grouped
    per KV head (B, H, M, d) (keys only), the layer's RopeMap when it is known and the layer keeps its first
    tokens (keys only), and `state`, a saved `calibration_state()` that takes precedence."""

    x: object = None
    queries: object = None
    state: dict = None
    rope: object = None

    def get(self, name, compute):
        """The saved value `name`, else compute() from the data."""
        return self.state[name] if self.state and name in self.state else compute()


def _fp16(spec, cfg, d, n_heads, layer, part, calib, use_kernels, batch, head_offset):
    return FP16


def _hqmq(spec, cfg, d, n_heads, layer, part, calib, use_kernels, batch, head_offset):
    median = (calib.state or {}).get("median")
    return HQMQ(
        d, n_heads, config=spec.hqmq, seed=cfg.seed, layer=layer, part=part, median=median, head_offset=head_offset
    )


def _rope_centring(spec, part, calib):
    """(RopeMap, mu (H, d), or (B, H, d) for batch rows, block) for RoPE-aware key centring (center="rope"), from
    the saved state (block 1, exact, in states saved before blocks) or fitted to calib.x; None where it does not
    apply (values, no known RoPE): the static mean then."""
    if part != "k" or spec.center != "rope":
        return None
    st = calib.state or {}
    if "rope_mean" in st:
        rmap = RopeMap.from_state({k[5:]: v for k, v in st.items() if k[5:] in RopeMap._fields and k[:5] == "rope_"})
        return rmap, st["rope_mean"], int(st["rope_block"].item()) if "rope_block" in st else 1
    if st or calib.rope is None or calib.x is None:
        return None
    return calib.rope, fit_mean(calib.rope, calib.x, block=BLOCK), BLOCK


def _turboquant(spec, cfg, d, n_heads, layer, part, calib, use_kernels, batch, head_offset):
    rope = _rope_centring(spec, part, calib)
    mean = calib.get("mean", lambda: channel_mean(calib.x)) if spec.center and rope is None else None
    weight = None

    def centred():
        """calib.x less its turned mean (RoPE-centred keys), else calib.x."""
        return calib.x if rope is None else calib.x - rotate(rope[0], rope[1], 0, calib.x.shape[2], rope[2])

    if part == "k" and spec.query_weighting:
        fn = query_whitening if spec.query_weighting == "full" else query_weights

        def learn():
            if calib.queries is None:
                return None
            return fn(calib.x, calib.queries, mean) if rope is None else fn(centred(), calib.queries)

        weight = calib.get("weight", learn)
    common = dict(
        qjl=spec.qjl,
        rotation=cfg.rotation,
        mean=mean,
        weight=weight,
        grid=spec.grid,
        seed=cfg.seed,
        layer=layer,
        part=part,
        head_offset=head_offset,
        use_kernels=use_kernels,
        batch=batch,
        rope=rope,
    )
    if spec.bits == int(spec.bits):
        return TurboQuant(d, n_heads, int(spec.bits), **common)
    sizes, seg_bits = split_sizes(spec.bits, d)
    perm = calib.get("perm", lambda: outlier_channels(centred() if mean is None else calib.x - mean[:, None]))
    return TurboQuant(d, n_heads, seg_bits, sizes, perm=perm, **common)


def _never(spec, part):
    return False


@dataclass(frozen=True)
class CodecKind:
    build: Callable  # (spec, cfg, d, n_heads, layer, part, calib, use_kernels, batch, head_offset) -> Codec
    needs_queries: Callable  # (spec, part) -> bool


CODECS = {
    "fp16": CodecKind(_fp16, _never),
    "turboquant": CodecKind(_turboquant, lambda spec, part: part == "k" and bool(spec.query_weighting)),
    "hqmq": CodecKind(_hqmq, _never),
}


def _dims_error(spec, d):
    """Why codec `spec` cannot code vectors of size d, or None."""
    if spec.codec == "fp16" or d == 0:
        return None
    if spec.codec == "hqmq":
        return None if d % 4 == 0 and 4 <= d <= 1020 else "HQMQ needs a multiple of 4 in 4..1020"
    if not 16 <= d <= 1024:
        return "TurboQuant codes sizes 16..1024"
    if spec.grid == "uniform" and d % 32:
        return "the uniform grid (-fast presets) needs a multiple of 32"
    if spec.bits != int(spec.bits) and d < 32:
        return "the outlier split needs at least 32"
    return None


def check_dims(cfg: CacheConfig, d: int, where: str = "a layer"):
    """Refuse a head size the config's codecs cannot code, naming the layer and what to use instead."""
    for part, spec in (("keys", cfg.keys), ("values", cfg.values)):
        why = _dims_error(spec, d)
        if why:
            raise ValueError(
                f"{where}: {part} of size {d} cannot be coded ({why}); use another preset (e.g. 'fp16', or a "
                "Lloyd-Max one instead of -fast) or mlx-lm's own cache for this model"
            )


def needs_queries(spec: CodecSpec, part: str) -> bool:
    """True when building this codec learns from queries (so the cache waits for an attention call)."""
    return CODECS[spec.codec].needs_queries(spec, part)


def build_codec(
    spec: CodecSpec,
    cfg: CacheConfig,
    d: int,
    n_heads: int,
    layer: int,
    part: str,
    calib: Calibration = Calibration(),
    use_kernels: bool = False,
    batch: bool = False,
    head_offset: int = 0,
):
    """The codec object for (layer, part): part "k" or "v"; use_kernels: encode through Metal kernels.
    batch: calib.state holds one calibration per batch row, stacked on a leading axis (`batch_codecs`).
    head_offset: the global index of the first of the n_heads heads (a tensor-parallel rank's slice).
    Size-0 vectors (a keys-only cache: MiniMax-M3's indexer passes empty values) are kept as they are."""
    if d == 0:
        return FP16
    return CODECS[spec.codec].build(spec, cfg, d, n_heads, layer, part, calib, use_kernels, batch, head_offset)
