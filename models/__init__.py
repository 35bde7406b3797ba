"""Model loading for tq-mlx: bundled GGUF models, GGUF files and mlx-lm models.

>>> from tq_mlx.models import load
>>> model, tokenizer = load()               # SmolLM2-135M-Instruct
>>> model, tokenizer = load("gemma3-270m")  # Gemma-3-270M (base)
"""

from .bundled import BUNDLED, DEFAULT_MODEL, bundled_path, cache_dir
from .gguf_weights import ARCHITECTURES
from .loader import default_dtype, default_model_path, load, load_gguf

__all__ = [
    "ARCHITECTURES",
    "BUNDLED",
    "DEFAULT_MODEL",
    "bundled_path",
    "cache_dir",
    "default_dtype",
    "default_model_path",
    "load",
    "load_gguf",
]
