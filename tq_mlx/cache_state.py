"""Restoring a TurboQuantKVCache from its `state` (mlx-lm's load_prompt_cache), with every check.

mlx-lm rebuilds a cache with `cls.__new__` and `obj.state = state`, so the
state holds every setting.  A state that is not ours, from another version,
inconsistent, or holding non-finite numbers raises CacheStateError naming
the problem, before anything is used.
"""

import json

import mlx.core as mx

from .calibration import QueryStats
from .config import CacheConfig
from .rope_mean import RopeMap
from .sharding import Shard

STATE_VERSION = 3
STORES = ("exact", "sink", "codes", "window")


class CacheStateError(ValueError):
    """A saved cache state that is corrupt, from another version, or from another config/model."""


def prefixed(d: dict, prefix: str) -> dict:
    """The entries of d whose key starts with prefix, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}


def _meta(st) -> dict:
    try:
        meta = json.loads(st["tq_meta"])
        version = meta["version"]
    except Exception as e:
        raise CacheStateError(f"not a TurboQuantKVCache state (missing or corrupt 'tq_meta'): {e}") from None
    if version != STATE_VERSION:
        raise CacheStateError(
            f"TurboQuantKVCache state version {version} is not supported (expected {STATE_VERSION}); "
            "re-create the prompt cache with this version of tq-mlx"
        )
    return meta


def _check_finite(name: str, arrays: dict):
    bad = [k for k, a in arrays.items() if mx.issubdtype(a.dtype, mx.floating) and not mx.isfinite(a).all().item()]
    if bad:
        raise CacheStateError(f"corrupt cache file: {name} arrays {bad} hold non-finite values (NaN or inf)")


def restore(cache, st):
    """Set cache (a TurboQuantKVCache, possibly built by __new__) from state dict st."""
    meta = _meta(st)
    try:
        config = CacheConfig.from_json(json.dumps(meta["config"]))
        layer, offset, max_size, keep = meta["layer"], meta["offset"], meta["max_size"], meta["keep"]
        shape, expect, calibrated = meta["shape"], tuple(meta["expect"]), meta["calibration_length"]
        counts = {name: meta[f"n_{name}"] for name in STORES}
        chunk_size, start_position = meta.get("chunk_size"), meta.get("start_position", 0)
        shard = Shard(*(int(x) for x in meta.get("shard", ())))  # files from before sharding: unsharded
        if not 0 <= shard.rank < shard.size or shard.head_offset < 0:
            raise ValueError(f"shard {list(shard)} is not (rank < size, head offset >= 0)")
    except Exception as e:
        raise CacheStateError(f"corrupt cache metadata: {type(e).__name__}: {e}") from None
    stores = {name: prefixed(st, f"{name}_") for name in STORES}
    for name, n in counts.items():
        arrays = stores[name]
        bad = [k for k, v in arrays.items() if not isinstance(v, mx.array) or v.ndim < 3 or v.shape[2] != n]
        if bad or (n and not arrays):
            raise CacheStateError(f"corrupt cache state: {name} arrays {bad or 'missing'} do not hold {n} tokens")
        _check_finite(name, arrays)
    calib, qstats = prefixed(st, "calib_"), prefixed(st, "qstats_")
    _check_finite("calibration", calib)
    _check_finite("query statistics", qstats)
    if sum(counts.values()) > offset:
        raise CacheStateError(f"corrupt cache state: {sum(counts.values())} tokens held but offset {offset}")
    if bool(calibrated) == bool(counts["exact"]) and sum(counts.values()):
        raise CacheStateError("corrupt cache state: exact tokens and calibration do not go together")
    cache.config, cache.layer, cache.max_size, cache.keep = config, layer, max_size, keep
    cache.expect, cache.offset = expect, offset
    cache.chunk_size, cache.start_position, cache.shard = chunk_size, start_position, shard
    cache._clear()
    cache.shape = tuple(shape) if shape else None
    cache.calibration_length = calibrated
    cache.encoded = int(meta.get("encoded", counts["codes"]))  # files from before it: codes in position order
    saved_pos = stores["codes"].pop("k_pos", None)  # files from before RingSlots: each ring slot's position
    for name in STORES:
        getattr(cache, name).load(stores[name])
    cache.qstats = QueryStats.from_state(qstats) if qstats else None
    try:
        cache.rope = RopeMap.from_state(prefixed(st, "rope_"))
    except Exception as e:
        raise CacheStateError(f"corrupt cache state: RoPE map: {e}") from None
    if calibrated:
        try:
            cache._rebuild_codecs(calib)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
            raise CacheStateError(f"corrupt cache state: the codecs cannot be rebuilt ({why})") from None
        cache._configure_window()
    if saved_pos is not None:
        _check_ring_positions(cache, saved_pos)


def _check_ring_positions(cache, saved: mx.array):
    """A file from before RingSlots holds each ring code slot's position: they must be where the ring's layout
    puts them (the positions then follow from it and are not kept)."""
    ring = cache.ring_slots()
    n = saved.shape[2]
    if ring is None or not mx.array_equal(saved, mx.broadcast_to(mx.array(ring.positions(n)), saved.shape)).item():
        raise CacheStateError("corrupt cache state: the ring's saved code positions do not follow its layout")
