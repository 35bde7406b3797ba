"""Attention on a TurboQuantKVCache from MLX ops: the reference path (every back-end, the CPU's).

Decode (one query token): per cache block, the grouped queries are moved into
the block's stored domain once and scored against the encodings; one softmax in
float32 over all scores; per block the values are accumulated in the stored
domain and moved back with one inverse rotation per head.  The cache is never
rebuilt as fp vectors in the original domain.
Prefill (a chunk of queries): the codes are dequantized into the stored domain
once per layer and mx.fast.scaled_dot_product_attention runs there
(`stored_domain_attention`, shared with the Metal path).
"""

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask

from .fp16_codec import FP_KEY
from .partials import group_queries, sink_partial, ungroup


def mask_array(mask, B: int, H: int, G: int, L: int, T: int):
    """mlx-lm's mask (None, "causal", bool or additive array over T keys) as an array that broadcasts
    against scores (B, H, G, L, T), or None."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported mask {mask!r}; allowed: None, 'causal' or an array")
        if L == 1:
            return None
        mask = create_causal_mask(L, T - L)
    if mask.shape[-1] != T:
        raise ValueError(f"mask covers {mask.shape[-1]} keys but the cache holds {T}")
    if mask.ndim == 4:  # (B or 1, Hq or 1, L, T) -> (B or 1, H or 1, G or 1, L, T)
        b, hq = mask.shape[:2]
        mask = mask.reshape(b, H if hq > 1 else 1, G if hq > 1 else 1, *mask.shape[2:])
    return mask


def _apply(s, mask):
    """Scores s with mask (None, bool or additive) applied."""
    if mask is None:
        return s
    if mask.dtype == mx.bool_:
        return mx.where(mask, s, mx.array(-float("inf"), s.dtype))
    return s + mask.astype(s.dtype)


def stored_dtype(queries):
    """float32 stored-domain K/V for float32 models (the CPU), float16 for fp16/bf16 models."""
    return mx.float32 if queries.dtype == mx.float32 else mx.float16


def stored_domain_attention(cache, queries, scale, mask, sinks, coded, values_from_keys=False):
    """Prefill on dequantized codes: mx.fast.scaled_dot_product_attention on this layer's q/k/v in the coded
    block's stored domain (the fp16 blocks moved there with `to_stored`), the output rotated back.

    coded: (keys, values) of the coded block in the stored domain, centring mean included (B, H, n, d)."""
    B, Hq, L, dk = queries.shape
    H = cache.n_kv_heads
    dtype = stored_dtype(queries)
    blocks = cache.blocks(values_from_keys)
    ck, cv = next((b.k_codec, b.v_codec) for b in blocks if not b.is_fp)
    ks, vs = [], []  # temporal order
    for b in blocks:
        if b.is_fp:
            ks.append(ck.to_stored(b.k[FP_KEY]).astype(dtype))
            vs.append(cv.to_stored(b.v[FP_KEY]).astype(dtype))
        else:
            ks.append(coded[0].astype(dtype))
            vs.append(coded[1].astype(dtype))
    k = ks[0] if len(ks) == 1 else mx.concatenate(ks, axis=2)
    v = vs[0] if len(vs) == 1 else mx.concatenate(vs, axis=2)
    q = ck.rotate_query(group_queries(queries, H, 1.0)).reshape(B, Hq, L, dk).astype(dtype)
    o = mx.fast.scaled_dot_product_attention(
        q, k, v, scale=scale, mask=mask, sinks=None if sinks is None else sinks.astype(dtype)
    )
    o = cv.unrotate(o.astype(mx.float32).reshape(B, H, -1, v.shape[-1]))
    return ungroup(o, Hq, queries.dtype)


def reference_attention(cache, queries, scale, mask=None, sinks=None, values_from_keys=False):
    """softmax(scale q k^T + mask) v over every token in `cache`.

    queries: (B, Hq, L, dk), Hq a multiple of the cache's H; returns (B, Hq, L, dv) in queries.dtype.
    sinks: optional (Hq,) logits that join the softmax denominator.
    One softmax over all blocks' scores (not a merge of per-block partials): the same numbers as
    every earlier version, since quantized caches amplify last-bit differences (docs/turboquant.md).
    """
    B, Hq, L, _ = queries.shape
    blocks = cache.blocks(values_from_keys)
    coded = [b for b in blocks if not b.is_fp]
    if L > 1 and len(coded) == 1:  # prefill: dequantize once, then SDPA (MLX's quantized matmul is slow for L > 1)
        b = coded[0]
        coded_kv = (b.k_codec.decode_stored(b.k), b.v_codec.decode_stored(b.v))
        return stored_domain_attention(cache, queries, scale, mask, sinks, coded_kv, values_from_keys)
    H = cache.n_kv_heads
    G = Hq // H
    q = group_queries(queries, H, scale)
    s = mx.concatenate([b.k_codec.scores(b.k_codec.rotate_query(q), b.k) for b in blocks], axis=-1)
    T = s.shape[-1]
    s = _apply(s.reshape(B, H, G, L, T), mask_array(mask, B, H, G, L, T))
    if sinks is not None:
        sk = sink_partial(sinks, B, H, L).m.reshape(B, H, G, L, 1)
        p = mx.softmax(mx.concatenate([sk, s], axis=-1), axis=-1)[..., 1:]
    else:
        p = mx.softmax(s, axis=-1)
    p = p.reshape(B, H, G * L, T)
    out, start = 0.0, 0
    for b in blocks:
        out = out + b.v_codec.unrotate(b.v_codec.accumulate(p[..., start : start + b.length], b.v))
        start += b.length
    return ungroup(out, Hq, queries.dtype)
