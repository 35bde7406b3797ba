"""tq-mlx: a TurboQuant-compressed KV cache for MLX and mlx-lm.

import tq_mlx
cache = tq_mlx.make_prompt_cache(model, "k4v3")
mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache)
"""

from mlx_lm.models import cache as _mlx_cache

from . import patch
from .batch_cache import BatchTurboQuantKVCache
from .cache import TurboQuantKVCache
from .cache_state import CacheStateError
from .config import DEFAULT_PRESET, PRESETS, CacheConfig, CodecSpec, resolve_config
from .describe import cache_nbytes, describe_cache
from .prompt_cache import load_prompt_cache, make_prompt_cache, model_config

# mlx-lm's load_prompt_cache looks cache classes up in its own module namespace
_mlx_cache.TurboQuantKVCache = TurboQuantKVCache
patch.install()

__all__ = [
    "make_prompt_cache",
    "model_config",
    "cache_nbytes",
    "describe_cache",
    "load_prompt_cache",
    "TurboQuantKVCache",
    "BatchTurboQuantKVCache",
    "CacheConfig",
    "CodecSpec",
    "PRESETS",
    "DEFAULT_PRESET",
    "resolve_config",
    "CacheStateError",
]
__version__ = "0.1.0"
