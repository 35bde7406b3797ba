"""Attention on a TurboQuantKVCache, reference path built from MLX ops (runs on the CPU).

Queries are grouped per KV head, rotated once, scored against the codes in
the rotated domain, softmaxed in float32, and the values are accumulated in
the rotated domain with one inverse rotation per head at the end.  The cache
is never rebuilt as fp in the original domain.
"""

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask


def _mask_scores(s, mask, L, T):
    """Apply mlx-lm's mask (None, "causal", bool or additive array) to s (B, H, G, L, T)."""
    if mask is None:
        return s
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported mask {mask!r}; allowed: None, 'causal' or an array")
        if L == 1:
            return s
        mask = create_causal_mask(L, T - L)
    if mask.shape[-1] != T:
        raise ValueError(f"mask covers {mask.shape[-1]} keys but the cache holds {T}")
    if mask.ndim == 4:  # (B or 1, Hq or 1, L, T) -> (B, H, G, L, T)
        b, hq = mask.shape[:2]
        h, g = s.shape[1], s.shape[2]
        mask = mask.reshape(b, h if hq > 1 else 1, g if hq > 1 else 1, *mask.shape[2:])
    if mask.dtype == mx.bool_:
        return mx.where(mask, s, mx.array(-float("inf"), s.dtype))
    return s + mask.astype(s.dtype)


def reference_attention(cache, queries, scale, mask=None, sinks=None):
    """softmax(scale q k^T + mask) v over every token in `cache`.

    queries: (B, Hq, L, dk), Hq a multiple of the cache's H; returns (B, Hq, L, dv) in queries.dtype.
    sinks: optional (Hq,) logits that join the softmax denominator.
    """
    B, Hq, L, dk = queries.shape
    _, H, _, dv = cache.shape
    G = Hq // H
    q = (queries.astype(mx.float32) * scale).reshape(B, H, G * L, dk)
    cache.encode_pending(q)
    parts = cache.parts()
    scores = [ck.scores(ck.rotate_query(q), ek) for ck, _, ek, _ in parts]
    s = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=-1)
    T = s.shape[-1]
    s = _mask_scores(s.reshape(B, H, G, L, T), mask, L, T)
    if sinks is not None:
        sk = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, H, G, 1, 1), (B, H, G, L, 1))
        p = mx.softmax(mx.concatenate([sk, s], axis=-1), axis=-1)[..., 1:]
    else:
        p = mx.softmax(s, axis=-1)
    p = p.reshape(B, H, G * L, T)
    out, start = 0.0, 0
    for (_, cv, _, ev), sc in zip(parts, scores):
        n = sc.shape[-1]
        out = out + cv.unrotate(cv.accumulate(p[..., start : start + n], ev))
        start += n
    return out.reshape(B, Hq, L, dv).astype(queries.dtype)
