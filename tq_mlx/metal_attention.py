"""Attention on a TurboQuantKVCache through the Metal kernels of `tq_mlx.kernels`.

- decode (L = 1): tq_decode scores the packed codes (queries rotated inside, split-K blocks as the
  GPU needs) and the fp16 blocks (sink tokens, the recent window), tq_merge combines the blocks,
  adds the centring means back, rotates the output back and normalises, all with the attention
  sinks: two launches, no host sync, no other op;
- prefill (L > 1): the codes are dequantized into the stored (rotated) domain with tq_dequant
  (float16; float32 for float32 models) and `reference_attention.stored_domain_attention` runs
  mx.fast.scaled_dot_product_attention on this layer's stored-domain q/k/v.
`attention.unsupported_reason` says when this path applies.  Each kernel instantiation runs its
first time under `kernels.guarded`: a failure falls back to the reference path (None here).
"""

import mlx.core as mx

from . import kernels as K
from .fp16_codec import FP_KEY
from .reference_attention import stored_domain_attention, stored_dtype

_PLACEHOLDERS = {}


def _placeholder(shape):
    """A zero array of `shape` (float16) for an absent input, made and evaluated once."""
    z = _PLACEHOLDERS.get(shape)
    if z is None:
        z = _PLACEHOLDERS[shape] = mx.zeros(shape, mx.float16)
        mx.eval(z)
    return z


def _fp16_inputs(buf, B, H, D):
    """(k, v, count) for tq_decode from an fp16 store's buffers, or placeholders when it is empty."""
    if buf is None:
        z = _placeholder((B, H, 1, D))
        return z, z, 0
    return buf.k[FP_KEY], buf.v[FP_KEY], buf.length


def kernel_decode(cache, queries, scale, sinks=None):
    """L = 1: tq_decode + tq_merge.  Returns (B, Hq, 1, dv) in queries.dtype, or None (kernel unusable)."""
    B, Hq, _, D = queries.shape
    H = cache.n_kv_heads
    G = Hq // H
    ck, cv = cache.k_codec, cache.v_codec
    buf = cache.code_buffers()
    sink, window = cache.fp16_buffers()
    sk, sv, S = _fp16_inputs(sink, B, H, D)
    wk, wv, R = _fp16_inputs(window, B, H, D)
    qmap, omap = ck.kernel_map("query"), cv.kernel_map("output")

    def run():
        po, pm, pl = K.decode_partials(
            queries,
            scale,
            qmap,
            ck.kernel_mean_rot,
            buf.k["codes0"],
            buf.k["norm0"],
            buf.v["codes0"],
            buf.v["norm0"],
            ck.levels,
            cv.levels,
            sk,
            sv,
            wk,
            wv,
            buf.length,
            S,
            R,
            G,
            kfmt=ck.kernel_format,
            vfmt=cv.kernel_format,
        )
        return K.merge(po, pm, pl, cv.kernel_mean_rot, omap, sinks, G, queries.dtype)

    key = (
        "decode",
        queries.dtype,
        buf.k["norm0"].dtype,
        D,
        ck.kernel_format,
        cv.kernel_format,
        G,
        qmap.ndim,
        sinks is not None,
    )
    out = K.guarded(key, run)
    return None if out is None else out.reshape(B, Hq, 1, D)


def kernel_prefill(cache, queries, scale, mask=None, sinks=None):
    """L > 1: the codes dequantized by tq_dequant, then attention in the stored domain; or None."""
    dk = queries.shape[-1]
    dtype = stored_dtype(queries)
    ck, cv = cache.k_codec, cache.v_codec
    buf = cache.code_buffers()

    def dequant():
        out = []
        for codec, enc in ((ck, buf.k), (cv, buf.v)):
            y = K.dequantize(
                enc["codes0"], enc["norm0"], codec.levels, buf.length, codec.d, dtype, fmt=codec.kernel_format
            )
            out.append(y if codec.mean_rot is None else (y.astype(mx.float32) + codec.mean_rot).astype(dtype))
        return out

    key = ("dequant", dtype, buf.k["norm0"].dtype, dk, ck.kernel_format, cv.kernel_format)
    coded = K.guarded(key, dequant)
    return None if coded is None else stored_domain_attention(cache, queries, scale, mask, sinks, coded)
