"""Attention as partial softmax sums merged by (max, sum-exp): what every attention path shares.

A cache's blocks (fp16 sinks, codes, the fp16 window) are attended separately;
each gives a `Partial` (o, m, l) with m the row max of its scores, l the sum of
exp(s - m) and o the un-normalised sum of exp(s - m) v, in the original domain.
`merge` combines them exactly: softmax over all keys = (sum_i o_i e^(m_i - M)) /
(sum_i l_i e^(m_i - M)), M = max_i m_i.  Attention sinks are a Partial with no o.

Queries are grouped per KV head: (B, Hq, L, d) -> (B, H, G*L, d), row g*L + l
for query head h*G + g at position l, so one matmul per KV head serves its G heads.
"""

from typing import NamedTuple

import mlx.core as mx


class Partial(NamedTuple):
    o: mx.array | None  # (B, H, M, dv) float32 un-normalised, original domain; None: a sink logit
    m: mx.array  # (B, H, M) row max (-inf where a row saw no key)
    l: mx.array  # (B, H, M) sum of exp(s - m)


def group_queries(queries: mx.array, n_kv_heads: int, scale: float) -> mx.array:
    """(B, Hq, L, d) -> scaled float32 (B, H, G*L, d), Hq = G * H."""
    B, Hq, L, d = queries.shape
    if Hq % n_kv_heads:
        raise ValueError(f"{Hq} query heads are not a multiple of the cache's {n_kv_heads} KV heads")
    return (queries.astype(mx.float32) * scale).reshape(B, n_kv_heads, (Hq // n_kv_heads) * L, d)


def ungroup(out: mx.array, n_q_heads: int, dtype) -> mx.array:
    """(B, H, G*L, dv) -> (B, Hq, L, dv) in dtype."""
    B, H, GL, dv = out.shape
    return out.reshape(B, n_q_heads, GL * H // n_q_heads, dv).astype(dtype)


def from_scores(s: mx.array, values_fn) -> Partial:
    """Partial of scores s (B, H, M, n) (masked entries -inf); values_fn(p) -> sum_t p_t v_t (B, H, M, dv)."""
    m = s.max(axis=-1)
    p = mx.exp(s - mx.where(mx.isinf(m), 0.0, m)[..., None])
    return Partial(values_fn(p), m, p.sum(axis=-1))


def sink_partial(sinks: mx.array, B: int, H: int, L: int) -> Partial:
    """Attention-sink logits (Hq,) as a Partial: they join the denominator only."""
    G = sinks.shape[0] // H
    m = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, H, G, 1), (B, H, G, L)).reshape(B, H, G * L)
    return Partial(None, m, mx.ones_like(m))


def merge(parts) -> mx.array:
    """Normalised attention output (B, H, M, dv) float32 from Partials covering every key."""
    M = parts[0].m
    for p in parts[1:]:
        M = mx.maximum(M, p.m)
    num, den = 0.0, 0.0
    for p in parts:
        f = mx.exp(p.m - M)
        den = den + p.l * f
        if p.o is not None:
            num = num + p.o * f[..., None]
    return num / den[..., None]
