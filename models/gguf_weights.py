"""Build an mlx-lm model from a GGUF file.

Supported GGUF architectures: llama, qwen2 and gemma3 (mlx-lm's
``gemma3_text``). Quantized weights are dequantized to float: files whose
tensors are all F32/F16/Q4_0/Q4_1/Q8_0 go through ``mx.load`` and
``mx.dequantize``; anything else (Q4_K, Q5_0, Q6_K, ...) goes through
``gguf.quants.dequantize``.
"""

import importlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

from .gguf_file import GGUFTensor, read_gguf

# GGUF general.architecture -> mlx_lm.models module
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}

# Tensor types that mx.load reads itself (it refuses the whole file otherwise).
_MX_TYPES = {Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q8_0}

_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per block.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _unsupported(arch: str) -> ValueError:
    return ValueError(f"Unsupported GGUF architecture '{arch}'; supported: {sorted(ARCHITECTURES)}")


def _num(x) -> Any:
    """GGUF stores floats as float32: 9.999999747e-06 -> 1e-05."""
    return float(f"{x:.7g}") if isinstance(x, float) else x


def model_config(meta: dict[str, Any], tensors: dict[str, GGUFTensor]) -> dict:
    """An mlx-lm ``config.json``-style dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise _unsupported(arch)

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):
            raise ValueError(f"GGUF {arch}.{key} varies per layer; not supported")
        return _num(value)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    config = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling != "none":
        raise ValueError(f"GGUF rope scaling '{scaling}' is not supported")
    if arch == "gemma3":
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # per-layer flags: True = sliding
            pattern = pattern.index(False) + 1 if False in pattern else len(pattern) + 1
        config.update(
            rope_local_base_freq=get("rope.freq_base_swa", 10000.0),
            sliding_window=get("attention.sliding_window", 512),
            sliding_window_pattern=pattern,
            # llama.cpp: 1/sqrt(head_dim), except Gemma-3-27B (62 layers).
            query_pre_attn_scalar=(hidden // heads if config["num_hidden_layers"] == 62 else config["head_dim"]),
        )
    return config


def _mx_load(path: str) -> dict[str, mx.array]:
    """GGUF tensors via ``mx.load``, quantized ones dequantized (group 32)."""
    raw = mx.load(path)
    out = {}
    for key, w in raw.items():
        if key.endswith((".scales", ".biases")):
            continue
        base = key.rsplit(".", 1)[0]
        scales = raw.get(base + ".scales")
        if scales is not None:
            # One scale per 32 values; fp16 scales would make the output fp16.
            bits = w.shape[-1] // scales.shape[-1]
            biases = raw[base + ".biases"].astype(mx.float32)
            w = mx.dequantize(w, scales.astype(mx.float32), biases, group_size=32, bits=bits)
        out[key] = w
    return out


def _np_dequantize(t: GGUFTensor) -> np.ndarray:
    return dequantize(t.data, t.qtype).reshape(t.shape)


def load_tensors(path: str, tensors: dict[str, GGUFTensor]) -> dict[str, mx.array]:
    """All tensors of a GGUF file as float arrays keyed by GGUF name."""
    if all(t.qtype in _MX_TYPES for t in tensors.values()):
        return _mx_load(path)
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        arrays = pool.map(_np_dequantize, tensors.values())
        return {name: mx.array(a) for name, a in zip(tensors, arrays)}


def _unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's Q/K row order: per head, rows (d/2, 2) -> (2, d/2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def mlx_name(name: str, arch: str) -> str:
    """GGUF tensor name -> mlx-lm parameter name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        names = _GEMMA_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
        if m[2] in names:
            return f"model.layers.{m[1]}.{names[m[2]]}.{m[3]}"
    else:
        m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
        if m and m[1] in _TOP_NAMES:
            return f"{_TOP_NAMES[m[1]]}.{m[2]}"
    raise ValueError(f"Unexpected tensor '{name}' in a GGUF {arch} model")


def to_mlx_weights(raw: dict[str, mx.array], arch: str, config: dict) -> dict[str, mx.array]:
    """Rename GGUF tensors for mlx-lm and undo llama.cpp's storage tweaks."""
    weights = {}
    for name, w in raw.items():
        if name == "rope_freqs.weight":
            continue  # becomes FreqsRoPE in load_gguf_model
        if arch == "llama" and ".attn_q." in name:
            w = _unpermute(w, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in name:
            w = _unpermute(w, config["num_key_value_heads"])
        elif arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
        weights[mlx_name(name, arch)] = w
    return weights


class FreqsRoPE(nn.Module):
    """RoPE with llama.cpp's per-frequency factors (``rope_freqs.weight``,
    Llama-3.1 style): angle = pos / (base**(2i/d) * factor_i)."""

    def __init__(self, dims: int, base: float, factors: mx.array):
        super().__init__()
        self.dims = dims
        self._freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims) * factors

    def __call__(self, x, offset=0):
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


def load_gguf_model(path, dtype: mx.Dtype = mx.float32) -> tuple[nn.Module, dict, dict[str, Any]]:
    """Build the mlx-lm model of a GGUF file.

    Returns ``(model, config, metadata)``; weights are ``dtype``.
    """
    path = str(path)
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    config = model_config(meta, tensors)  # raises for unsupported archs
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))

    raw = load_tensors(path, tensors)
    factors: mx.array | None = raw.get("rope_freqs.weight")
    weights = to_mlx_weights(raw, arch, config)
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    if factors is not None:
        for layer in model.layers:
            layer.self_attn.rope = FreqsRoPE(config["head_dim"], config["rope_theta"], factors.astype(mx.float32))
    mx.eval(model.parameters())
    model.eval()
    return model, config, meta
