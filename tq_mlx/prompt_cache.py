"""make_prompt_cache / load_prompt_cache for mlx-lm scripts.

`make_prompt_cache(model, "k4v3")` starts from the model's own cache list
(`model.make_cache()` where it exists) and replaces the plain full-attention
`KVCache` layers, and the sliding-window `RotatingKVCache` and chunked
`ChunkedKVCache` layers unless `quantize_sliding=False`, also inside `CacheList`s.  State-space and other
layers are kept as they are.  Every attention path a model may take is served
(`cache.py` says how); `describe_cache` reports what is compressed.
"""

import logging
from dataclasses import replace

from mlx_lm.models import cache as mlx_cache

from . import describe, patch, rope_mean, sharding
from .cache import TurboQuantKVCache
from .cache_state import CacheStateError
from .codec_factory import check_dims
from .config import resolve_config

log = logging.getLogger("tq_mlx")
KEEP = 4  # first tokens a sliding window keeps, as mlx-lm's make_prompt_cache(max_kv_size=...)


def _layer_dims(model, i: int, n: int):
    """(kv_heads, (dk, dv)) of layer i's attention when the model says so, else (None, None)."""
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) != n:
        return None, None
    attn = getattr(layers[i], "self_attn", None)
    h, d = getattr(attn, "n_kv_heads", None), getattr(attn, "head_dim", None)
    if isinstance(h, int) and isinstance(d, int):
        return h, (d, d)
    return None, None


def _layer_rope(model, i: int, n: int, cfg, dims):
    """Layer i's RopeMap (`rope_mean.probe` of its attention's `rope`) when the config centres keys with it."""
    layers = getattr(model, "layers", None)
    if cfg.keys.center != "rope" or not dims or layers is None or len(layers) != n:
        return None
    rope = getattr(getattr(layers[i], "self_attn", None), "rope", None)
    return None if rope is None or not callable(rope) else rope_mean.probe(rope, dims[0])


def _bounded(c, max_kv_size):
    """mlx-lm's fp cache for a layer kept uncompressed, as a sliding window when max_kv_size is set."""
    if max_kv_size is not None and type(c) is mlx_cache.KVCache:
        return mlx_cache.RotatingKVCache(max_size=max_kv_size, keep=KEEP)
    return c


def model_config(model, config=None, **overrides):
    """The CacheConfig make_prompt_cache uses for `model`: "auto" (the default) resolved for this machine and
    the model's head dims (config.auto_preset)."""
    base = mlx_cache.make_prompt_cache(model)
    dims = [_layer_dims(model, i, len(base))[1] for i in range(len(base))]
    return resolve_config(config, head_dims=[d for ds in dims if ds for d in ds], **overrides)


def make_prompt_cache(model, config=None, max_kv_size=None, **overrides):
    """A cache list for `model`: TurboQuant layers for every key/value cache mlx-lm would make.

    Starting from mlx-lm's own list (`model.make_cache()` where the model has one), each plain `KVCache`,
    sliding-window `RotatingKVCache` and chunked `ChunkedKVCache` (these two unless quantize_sliding=False)
    becomes a TurboQuantKVCache,
    also inside a `CacheList`; state-space and other caches stay as they are (`describe_cache` says
    which layers are compressed; attention caches mlx-lm keeps in another form are logged).
    config: preset name, "kXvY" or CacheConfig; the default, "auto", is k4v4 on the Metal kernels and
    k4v4-fast on the CPU (`config.auto_preset`); overrides set CacheConfig fields (fp_window, fp_sink,
    boundary_layers, quant_start, quantize_sliding, rotation, seed).
    max_kv_size: a sliding window of that many tokens (keep=4, as mlx-lm) for every full-attention
        layer, compressed or not, also for models with their own make_cache (where mlx-lm ignores it).
    A tensor-parallel model (`model.shard(group)`) gets each rank a cache of its own KV heads, coded with
    the constants of their global head indices (`sharding.py`).
    """
    if max_kv_size is not None and (
        isinstance(max_kv_size, bool) or not isinstance(max_kv_size, int) or max_kv_size <= KEEP
    ):
        raise ValueError(f"max_kv_size must be an integer above {KEEP}, got {max_kv_size!r}")
    patch.install()  # mlx-lm model modules imported since `import tq_mlx` are routed too
    base = mlx_cache.make_prompt_cache(model)
    n = len(base)
    cfg = model_config(model, config, **overrides)
    out = []
    for i, c in enumerate(base):
        h, dims = _layer_dims(model, i, n)
        for d in dims or ():
            check_dims(cfg, d, f"layer {i}")
        boundary = i < cfg.boundary_layers or i >= n - cfg.boundary_layers
        shard = sharding.layer_shard(model, i) if len(getattr(model, "layers", ())) == n else None
        rope = _layer_rope(model, i, n, cfg, dims)
        out.append(_swap(c, cfg, i, max_kv_size, boundary, h, dims, shard, rope))
    _report_uncompressed(out)
    return out


def _swap(c, cfg, layer, max_kv_size, boundary, h, dims, shard, rope=None):
    """The cache that replaces mlx-lm's cache c of one layer (CacheList members one by one)."""
    if type(c) is mlx_cache.CacheList:
        members = (_swap(m, cfg, layer, max_kv_size, boundary, None, None, shard) for m in c.caches)
        return mlx_cache.CacheList(*members)
    if boundary:
        return _bounded(c, max_kv_size)
    common = dict(kv_heads=h, head_dims=dims, shard=shard, rope=rope)
    if type(c) is mlx_cache.KVCache:
        keep = KEEP if max_kv_size else 0
        return TurboQuantKVCache(cfg, layer, max_size=max_kv_size, keep=keep, **common)
    if type(c) is mlx_cache.RotatingKVCache and cfg.quantize_sliding:
        return TurboQuantKVCache(cfg, layer, max_size=c.max_size, keep=c.keep, **common)
    if type(c) is mlx_cache.ChunkedKVCache and cfg.quantize_sliding:
        return TurboQuantKVCache(cfg, layer, chunk_size=c.chunk_size, **common)
    return c


def _report_uncompressed(cache):
    """Log the attention caches mlx-lm keeps in a form TurboQuant does not take over (no silent saving gap)."""
    kept = [
        f"{i}: {kind}"
        for i, kind, compressed in describe.layers(cache)
        if not compressed and kind.startswith(describe.UNTAKEN)
    ]
    if kept:
        log.warning(
            "tq_mlx: %d attention layer(s) keep mlx-lm's cache, uncompressed (%s)",
            len(kept),
            ", ".join(kept[:6]) + (", ..." if len(kept) > 6 else ""),
        )


def load_prompt_cache(path, model=None, config=None, return_metadata=False, group=None):
    """mlx-lm's load_prompt_cache, checked: with `config` or `model`, a file from another config
    or another model raises CacheStateError instead of producing wrong text.  A cache saved by one rank
    of a tensor-parallel group holds only that rank's KV heads: it loads only as the same rank of a group
    of the same size (the model's sharding when `model` is given, else `group` or mx.distributed.init())."""
    try:
        cache, meta = mlx_cache.load_prompt_cache(str(path), return_metadata=True)
    except CacheStateError as e:
        raise CacheStateError(f"{path}: {e}") from None
    if model is None:
        _check_group(path, cache, sharding.current(group))
    else:
        expect = make_prompt_cache(model, config or _first_config(cache))
        _check_shards(path, expect, cache)
        if len(expect) != len(cache) or any(type(a) is not type(b) for a, b in zip(expect, cache)):
            raise CacheStateError(
                f"{path}: the cache has {len(cache)} layers of types "
                f"{sorted({type(c).__name__ for c in cache})}, the model expects {len(expect)} of "
                f"{sorted({type(c).__name__ for c in expect})}: it was saved for another model or config"
            )
        for a, b in zip(expect, cache):
            if (
                isinstance(a, TurboQuantKVCache)
                and None not in a.expect
                and b.shape is not None
                and (b.shape[1], *b.shape[2:]) != a.expect
            ):
                raise CacheStateError(
                    f"{path}: layer {a.layer} holds {b.shape[1]} KV heads of sizes "
                    f"{b.shape[2:]}, the model has {a.expect[0]} of {a.expect[1:]}: "
                    "it was saved for another model"
                )
    if config is not None:
        want = resolve_config(config)
        for c in cache:
            if isinstance(c, TurboQuantKVCache) and c.config != want:
                hint = ""
                if c.config == replace(want, keys=replace(want.keys, center=True)):  # saved before the presets' turn
                    static = want.name.split("+")[0] + "-static"
                    hint = (
                        "; its keys' mean was taken after RoPE (the presets' before 2026-12-01, now '-static'): "
                        f"load it with config={static!r} (and the same options), or with no config"
                    )
                raise CacheStateError(
                    f"{path}: saved with KV config {c.config.name!r}, expected {want.name!r} "
                    f"(they differ in content: {c.config.to_json()} vs {want.to_json()}){hint}"
                )
    return (cache, meta) if return_metadata else cache


def _tq_layers(cache):
    for c in cache:
        for m in c.caches if type(c) is mlx_cache.CacheList else (c,):
            if isinstance(m, TurboQuantKVCache):
                yield m


def _check_group(path, cache, where):
    """Refuse a cache saved under another (rank, group size) than `where`."""
    for c in _tq_layers(cache):
        if (c.shard.rank, c.shard.size) != where:
            here = f"rank {where[0]} of {where[1]}" if where[1] > 1 else "a single process"
            raise CacheStateError(
                f"{path}: layer {c.layer} holds the KV heads of {c.shard.describe()}, but this is {here}: "
                "a tensor-parallel cache loads only as the rank that saved it, in a group of the same size"
            )


def _check_shards(path, expect, cache):
    """Refuse a cache whose layers hold other KV heads than the (sharded) model's caches would."""
    for a, b in zip(_tq_layers(expect), _tq_layers(cache)):
        if a.shard != b.shard:
            raise CacheStateError(
                f"{path}: layer {b.layer} holds the KV heads of {b.shard.describe()}, but this model's "
                f"layer computes those of {a.shard.describe()}: load the file this rank saved, in a group "
                "of the same size"
            )


def _first_config(cache):
    for c in cache:
        if isinstance(c, TurboQuantKVCache):
            return c.config
    return None
