"""Which KV heads a tensor-parallel rank holds: the head offset of its compressed cache.

mlx-lm's `model.shard(group)` (llama, qwen2, qwen3, ...) gives rank r of N the
contiguous heads r*h .. r*h + h - 1 of every attention layer (h = H / N of the
model's H KV heads; its query heads are the matching G*h, so GQA's query head j
still reads KV head j // G).  A TurboQuant cache derives every per-head random
constant (rotation signs or matrices, QJL matrices, HQMQ quaternions) from the
global head index, so a rank's cache codes its heads exactly as a single
process would.  At make_prompt_cache time a layer whose attention holds mlx's
tensor-parallel linear layers is sharded over their group: its offset is the
rank times its KV heads (checked against the model's configured count).  The
Shard is saved in the cache state, so a reloaded cache is checked against the
group it runs in.
"""

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

_SHARDED = (
    nn.AllToShardedLinear,
    nn.ShardedToAllLinear,
    nn.QuantizedAllToShardedLinear,
    nn.QuantizedShardedToAllLinear,
)
_HEAD_ATTRS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")


class Shard(NamedTuple):
    """rank of size processes (0 of 1: not sharded) and the global index of the rank's first KV head."""

    rank: int = 0
    size: int = 1
    head_offset: int = 0

    def describe(self) -> str:
        if self.size == 1:
            return "a single process (all KV heads)"
        return f"rank {self.rank} of {self.size} (KV heads from {self.head_offset})"


def _args_dict(model) -> dict:
    args = getattr(model, "args", None)
    if args is None:
        return {}
    d = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    for nested in ("text_config", "text"):
        inner = d.get(nested)
        if inner is not None and not isinstance(inner, dict):
            inner = vars(inner)
        if isinstance(inner, dict):
            d = {**inner, **{k: v for k, v in d.items() if v is not None}}
    return d


def global_kv_heads(model) -> int | None:
    """The model's configured KV heads per layer (before any sharding), or None where it does not say."""
    d = _args_dict(model)
    h = d.get("num_key_value_heads") or d.get("num_attention_heads")
    return h if isinstance(h, int) and h > 0 else None


def local_kv_heads(model, i: int) -> int | None:
    """KV heads layer i's attention computes in this process (a sharded model's are a rank's share)."""
    layers = getattr(model, "layers", None)
    if layers is None or i >= len(layers):
        return None
    attn = getattr(layers[i], "self_attn", None)
    for name in _HEAD_ATTRS:
        h = getattr(attn, name, None)
        if isinstance(h, int) and h > 0:
            return h
    return None


def tensor_group(model, i: int):
    """The mx.distributed group layer i's attention is sharded over (its first tensor-parallel linear
    layer's, as `model.shard(group)` makes them), or None for a layer computed whole in this process."""
    layers = getattr(model, "layers", None)
    attn = getattr(layers[i], "self_attn", None) if layers is not None and i < len(layers) else None
    if not isinstance(attn, nn.Module):
        return None
    for _, m in attn.named_modules():
        if isinstance(m, _SHARDED):
            return m.group
    return None


def layer_shard(model, i: int) -> Shard:
    """The Shard of layer i's cache: Shard() for a layer computed whole; for a tensor-parallel layer
    (rank, size, rank * h) with h its KV heads per rank, or offset 0 where every rank holds all the
    KV heads (MLA's latent); ValueError for any other split (KV heads replicated in part)."""
    group = tensor_group(model, i)
    if group is None or group.size() == 1:
        return Shard()
    rank, size = group.rank(), group.size()
    h, total = local_kv_heads(model, i), global_kv_heads(model)
    if h is None or h == total:
        return Shard(rank, size, 0)
    if total is not None and h * size == total:
        return Shard(rank, size, rank * h)
    raise ValueError(
        f"layer {i} of this tensor-parallel model computes {h} KV heads per rank on {size} ranks, of the "
        f"model's {total}: not a split of whole heads, so its compressed cache cannot be matched to global "
        f"heads; use a group size that divides {total}"
    )


def current(group=None) -> tuple[int, int]:
    """(rank, size) of `group`, else of mx.distributed.init() ((0, 1) outside a distributed launch)."""
    g = group or mx.distributed.init()
    return g.rank(), g.size()
