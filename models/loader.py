"""``load()``: one entry point for bundled, GGUF and mlx-lm models."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .bundled import BUNDLED, DEFAULT_MODEL, bundled_path
from .gguf_tokenizer import load_gguf_tokenizer
from .gguf_weights import load_gguf_model


def default_dtype() -> mx.Dtype:
    """float32 on the CPU (fastest there), float16 on a GPU."""
    return mx.float32 if mx.default_device().type == mx.cpu else mx.float16


def default_model_path() -> Path:
    """GGUF path of the default bundled model (SmolLM2-135M-Instruct)."""
    return bundled_path(DEFAULT_MODEL)


def load_gguf(path, dtype: mx.Dtype | None = None) -> tuple[nn.Module, TokenizerWrapper]:
    """Model and tokenizer of a GGUF file; weights dequantized to ``dtype``."""
    model, _, meta = load_gguf_model(path, dtype or default_dtype())
    return model, load_gguf_tokenizer(meta)


def _load_mlx_lm(ref: str, dtype: mx.Dtype | None):
    import mlx_lm

    model, tokenizer = mlx_lm.load(ref)
    # Float weights only; quantized ones keep their packed integers.
    if dtype is not None:
        model.set_dtype(dtype)
    elif mx.default_device().type == mx.cpu:
        model.set_dtype(mx.float32)  # CPU fp16/bf16 matmuls are slow
    return model, tokenizer


def load(model_ref: str | Path | None = None, dtype: mx.Dtype | None = None) -> tuple[nn.Module, TokenizerWrapper]:
    """Load ``(model, tokenizer)`` for mlx-lm's ``generate``.

    ``model_ref`` is tried in this order:

    - ``None``: the bundled default, ``"smollm2-135m"``;
    - a bundled alias: ``"smollm2-135m"`` or ``"gemma3-270m"``;
    - a path to a ``.gguf`` file (llama, qwen2 or gemma3);
    - a local mlx-lm model directory (has ``config.json``);
    - a Hugging Face hub repo id, through ``mlx_lm.load``.

    ``dtype`` defaults to float32 on the CPU and float16 on a GPU for GGUF
    models; mlx-lm models keep their own dtype on a GPU.
    """
    ref = DEFAULT_MODEL if model_ref is None else str(model_ref)
    if ref in BUNDLED:
        return load_gguf(bundled_path(ref), dtype)
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return load_gguf(path, dtype)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_mlx_lm(str(path), dtype)
    try:
        return _load_mlx_lm(ref, dtype)
    except Exception as e:
        raise ValueError(
            f"Could not load model '{ref}': it is not a bundled alias "
            f"({', '.join(sorted(BUNDLED))}), not a .gguf file, not a local "
            f"mlx-lm model directory (with config.json), and loading it as a "
            f"Hugging Face hub id failed: {type(e).__name__}: {e}"
        ) from e
