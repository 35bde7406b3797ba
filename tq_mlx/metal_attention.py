"""Attention on a TurboQuantKVCache through the Metal kernels of `tq_mlx.kernels`.

- decode (L = 1): `kernels.decode_attention` on the packed codes (single pass,
  or split-K + merge for long contexts), merged with the cache's fp16 blocks
  (sink tokens, the recent window) and the attention sinks by (max, sum-exp);
- prefill (L > 1): the codes are dequantized into the stored (rotated) domain
  with `kernels.dequantize` (float16; float32 for float32 models), the fp16
  blocks are moved into the same domain with `codec.to_stored`, and
  mx.fast.scaled_dot_product_attention runs on this layer's stored-domain q/k/v.
Query-weighted keys need no kernel change: `rotate_query` gives R (q / w) and
`to_stored` gives R (w k).  A centred codec's mean (`codec.mean_rot`) is added
back here (decode: score shift and sum-exp times the mean; prefill: added to
the dequantized tensors).  `attention.unsupported_reason` says when this path applies.
"""

import mlx.core as mx

from . import kernels as K
from .fp16_codec import FP_KEY
from .partials import Partial, from_scores, group_queries, merge, sink_partial, ungroup


def kernel_decode(cache, queries, scale, sinks=None):
    """L = 1: one kernel over the codes, merged with the fp16 blocks and sinks."""
    B, Hq, _, _ = queries.shape
    H = cache.n_kv_heads
    G = Hq // H
    q = group_queries(queries, H, scale)  # (B, H, G, dk)
    parts = []
    for b in cache.blocks():
        if b.is_fp:
            k, v = b.k[FP_KEY].astype(mx.float32), b.v[FP_KEY].astype(mx.float32)
            parts.append(from_scores(q @ mx.swapaxes(k, -1, -2), lambda p, v=v: p @ v))
            continue
        ck, cv = b.k_codec, b.v_codec
        buf = cache.code_buffers()
        qr = ck.rotate_query(q)
        o, m, l = K.decode_attention(
            qr.reshape(B * H, G, -1),
            buf.k["codes0"],
            buf.k["norm0"],
            buf.v["codes0"],
            buf.v["norm0"],
            ck.levels,
            cv.levels,
            buf.length,
        )
        o, m, l = o.reshape(B, H, G, -1), m.reshape(B, H, G), l.reshape(B, H, G)
        if ck.mean_rot is not None:  # centred keys: every coded score gains <R q, R mean_k>
            m = m + (qr * ck.mean_rot).sum(axis=-1)
        if cv.mean_rot is not None:  # centred values: sum_t p_t (y_t + R mean_v)
            o = o + l[..., None] * cv.mean_rot
        parts.append(Partial(cv.unrotate(o), m, l))
    if sinks is not None:
        parts.append(sink_partial(sinks, B, H, 1))
    return ungroup(merge(parts), Hq, queries.dtype)


def kernel_prefill(cache, queries, scale, mask=None, sinks=None):
    """L > 1: mx.fast.scaled_dot_product_attention on this layer's stored-domain q/k/v.

    float32 models (the CPU) get float32 stored-domain K/V; fp16/bf16 models float16."""
    B, Hq, L, dk = queries.shape
    H = cache.n_kv_heads
    dtype = mx.float32 if queries.dtype == mx.float32 else mx.float16
    blocks = cache.blocks()
    sinks = None if sinks is None else sinks.astype(dtype)
    coded = [b for b in blocks if not b.is_fp]
    if not coded:  # fp16 tokens only: attention in the original domain
        k = mx.concatenate([b.k[FP_KEY] for b in blocks], axis=2).astype(dtype)
        v = mx.concatenate([b.v[FP_KEY] for b in blocks], axis=2).astype(dtype)
        o = mx.fast.scaled_dot_product_attention(queries.astype(dtype), k, v, scale=scale, mask=mask, sinks=sinks)
        return o.astype(queries.dtype)
    ck, cv = coded[0].k_codec, coded[0].v_codec
    ks, vs = [], []  # temporal order, all in the stored domain
    for b in blocks:
        if b.is_fp:
            ks.append(ck.to_stored(b.k[FP_KEY]).astype(dtype))
            vs.append(cv.to_stored(b.v[FP_KEY]).astype(dtype))
            continue
        buf = cache.code_buffers()
        for xs, codec, enc in ((ks, ck, buf.k), (vs, cv, buf.v)):
            y = K.dequantize(enc["codes0"], enc["norm0"], codec.levels, buf.length, codec.d, dtype)
            xs.append(y if codec.mean_rot is None else (y.astype(mx.float32) + codec.mean_rot).astype(dtype))
    k = ks[0] if len(ks) == 1 else mx.concatenate(ks, axis=2)
    v = vs[0] if len(vs) == 1 else mx.concatenate(vs, axis=2)
    q = ck.rotate_query(group_queries(queries, H, 1.0)).reshape(B, Hq, L, dk).astype(dtype)
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    o = cv.unrotate(o.astype(mx.float32).reshape(B, H, -1, v.shape[-1]))
    return ungroup(o, Hq, queries.dtype)
