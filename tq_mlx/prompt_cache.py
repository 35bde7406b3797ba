"""make_prompt_cache / load_prompt_cache for mlx-lm scripts.

`make_prompt_cache(model, "k4v3")` starts from the model's own cache list
(`model.make_cache()` where it exists) and replaces the plain full-attention
`KVCache` layers, and the sliding-window `RotatingKVCache` layers unless
`quantize_sliding=False`.  State-space and other layers are kept as they are.
"""

import inspect
import sys

from mlx_lm.models import cache as mlx_cache

from . import patch
from .cache import TurboQuantKVCache
from .cache_state import CacheStateError
from .config import resolve_config

_DIRECT_SDPA = "mx.fast.scaled_dot_product_attention("
KEEP = 4  # first tokens a sliding window keeps, as mlx-lm's make_prompt_cache(max_kv_size=...)


def _check_model(model):
    """Refuse models whose attention bypasses mlx-lm's scaled_dot_product_attention helper."""
    seen = set()
    for m in [model, *(m for _, m in model.named_modules())]:
        mod = sys.modules.get(type(m).__module__)
        if mod is None or mod.__name__ in seen or not mod.__name__.startswith("mlx_lm.models."):
            continue
        seen.add(mod.__name__)
        try:
            src = inspect.getsource(mod)
        except (OSError, TypeError):
            continue
        if _DIRECT_SDPA in src:
            raise NotImplementedError(
                f"{mod.__name__} calls mx.fast.scaled_dot_product_attention directly, bypassing "
                "mlx-lm's attention helper, so TurboQuant caches cannot serve it (it would attend to "
                "the newest tokens only). Use mlx-lm's own cache for this model."
            )


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
    """A cache list for `model`: TurboQuant layers where attention is plain KV or sliding-window.

    config: preset name, "kXvY" or CacheConfig; the default, "auto", is k4v4 on the Metal kernels and
    k4v4-fast on the CPU (`config.auto_preset`); overrides set CacheConfig fields (fp_window, fp_sink,
    boundary_layers, quant_start, quantize_sliding, rotation, seed).
    max_kv_size: a sliding window of that many tokens (keep=4, as mlx-lm) for every full-attention
        layer, compressed or not, also for models with their own make_cache (where mlx-lm ignores it).
    """
    if max_kv_size is not None and (
        isinstance(max_kv_size, bool) or not isinstance(max_kv_size, int) or max_kv_size <= KEEP
    ):
        raise ValueError(f"max_kv_size must be an integer above {KEEP}, got {max_kv_size!r}")
    _check_model(model)
    patch.install()  # mlx-lm model modules imported since `import tq_mlx` are routed too
    base = mlx_cache.make_prompt_cache(model)
    n = len(base)
    dims = [_layer_dims(model, i, n) for i in range(n)]
    cfg = model_config(model, config, **overrides)
    nb = cfg.boundary_layers
    out = []
    for i, c in enumerate(base):
        h, dims_i = dims[i]
        if i < nb or i >= n - nb:
            out.append(_bounded(c, max_kv_size))
        elif type(c) is mlx_cache.KVCache:
            keep = KEEP if max_kv_size else 0
            out.append(TurboQuantKVCache(cfg, i, max_size=max_kv_size, keep=keep, kv_heads=h, head_dims=dims_i))
        elif type(c) is mlx_cache.RotatingKVCache and cfg.quantize_sliding:
            out.append(TurboQuantKVCache(cfg, i, max_size=c.max_size, keep=c.keep, kv_heads=h, head_dims=dims_i))
        else:
            out.append(c)
    return out


def load_prompt_cache(path, model=None, config=None, return_metadata=False):
    """mlx-lm's load_prompt_cache, checked: with `config` or `model`, a file from another config
    or another model raises CacheStateError instead of producing wrong text."""
    try:
        cache, meta = mlx_cache.load_prompt_cache(str(path), return_metadata=True)
    except CacheStateError as e:
        raise CacheStateError(f"{path}: {e}") from None
    if model is not None:
        expect = make_prompt_cache(model, config or _first_config(cache))
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
                raise CacheStateError(
                    f"{path}: saved with KV config {c.config.name!r}, expected {want.name!r} "
                    f"(they differ in content: {c.config.to_json()} vs {want.to_json()})"
                )
    return (cache, meta) if return_metadata else cache


def _first_config(cache):
    for c in cache:
        if isinstance(c, TurboQuantKVCache):
            return c.config
    return None
