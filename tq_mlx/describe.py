"""What a cache list holds, layer by layer: `describe_cache(cache)`, a one-line `summary`, and `fp16_bytes`
(what mlx-lm's fp16 cache would hold for the same tokens)."""

from collections import Counter

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

from . import rope_mean
from .cache import TurboQuantKVCache

UNTAKEN = ("affine-quantized", "concatenating")  # attention caches TurboQuant leaves to mlx-lm


def _kind(c) -> tuple[str, bool]:
    """(what the layer holds, whether TurboQuant compresses it)."""
    if isinstance(c, TurboQuantKVCache):
        kind = (
            f"sliding window {c.max_size}"
            if c.max_size is not None
            else f"chunked attention {c.chunk_size}"
            if c.chunk_size is not None
            else "full attention"
        )
        how = (
            "attention on the codes"
            if not c.hands_out_all
            else "the model reads decoded keys/values"
            if c.calibrated
            else "exact so far"
        )
        if c.config.keys.center == "rope":  # say where RoPE-aware centring does not apply
            rope = c.rope is not None and c.chunk_size is None
            blk = c.k_codec.rope_block if getattr(c.k_codec, "rope_map", None) is not None else rope_mean.BLOCK
            turned = f"mean turned per {blk} positions" if blk > 1 else "mean turned to every position"
            how += (
                f", keys centred before RoPE ({turned})" if rope else ", static key mean (no RoPE map for this layer)"
            )
        return f"{kind}, TurboQuant {c.config.name} ({how})", True
    if isinstance(c, mlx_cache.CacheList):
        parts = [_kind(m) for m in c.caches]
        return "list: " + "; ".join(p for p, _ in parts), any(comp for _, comp in parts)
    kinds = {
        mlx_cache.KVCache: "full attention",
        mlx_cache.RotatingKVCache: "sliding window",
        mlx_cache.ChunkedKVCache: "chunked attention",
        mlx_cache.QuantizedKVCache: "affine-quantized",
        mlx_cache.ConcatenateKVCache: "concatenating",
        mlx_cache.ArraysCache: "state space",
    }
    for cls, kind in kinds.items():
        if type(c) is cls:
            return f"{kind} (mlx-lm's {cls.__name__})", False
    return f"{type(c).__name__} (mlx-lm's)", False


def layers(cache):
    """[(layer index, description, compressed)] for a cache list."""
    return [(i, *_kind(c)) for i, c in enumerate(cache)]


def describe_cache(cache) -> list[str]:
    """One line per layer: what it holds and whether TurboQuant compresses it."""
    return [f"layer {i}: {kind}" for i, kind, _ in layers(cache)]


def summary(cache) -> str:
    """e.g. "30 of 30 layers compressed", or "28 of 30 layers compressed; kept: 2 x full attention (mlx-lm's
    KVCache)"."""
    rows = layers(cache)
    done = sum(comp for _, _, comp in rows)
    kept = Counter(kind for _, kind, comp in rows if not comp)
    tail = "; kept: " + ", ".join(f"{n} x {kind}" for kind, n in kept.items()) if kept else ""
    return f"{done} of {len(rows)} layers compressed{tail}"


def cache_nbytes(cache) -> int:
    """Bytes a whole prompt cache (a list of layers) holds: each layer's `nbytes`, plus the constants layers share
    (a model's RoPE map and its tables, `shared_constants`) once each."""
    shared = {}
    for c in cache:
        shared.update({id(a): a.nbytes for a in getattr(c, "shared_constants", list)()})
    return sum(c.nbytes for c in cache) + sum(shared.values())


def fp16_bytes(c) -> int:
    """Bytes an fp16 K/V cache layer would hold for the tokens this layer holds now (a sliding layer holds up
    to max_size + L - 1 right after an L-token update, in mlx-lm's RotatingKVCache as in ours)."""
    if isinstance(c, TurboQuantKVCache):
        if c.shape is None:
            return 0
        b, h, dk, dv = c.shape
        return 2 * b * h * c.held() * (dk + dv)
    keys, values = getattr(c, "keys", None), getattr(c, "values", None)
    if not isinstance(keys, mx.array) or not isinstance(values, mx.array):
        return c.nbytes
    b, h, _, dk = keys.shape
    return 2 * b * h * min(c.offset, keys.shape[2]) * (dk + values.shape[-1])
