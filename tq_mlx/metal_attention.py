"""Attention on a TurboQuantKVCache through the Metal kernels of `tq_mlx.kernels`.

- decode (L = 1): tq_decode scores the packed codes (queries rotated inside, split-K blocks as the
  GPU needs) and the fp16 blocks (sink tokens, the recent window; a batch row's exact tokens too, with
  each row's own counts and codec constants: `decode_on_kernels`), tq_merge combines the blocks,
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
from .rope_mean import AtPositions, at

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
    """L = 1 on a TurboQuantKVCache: tq_decode + tq_merge.  (B, Hq, 1, dv) in queries.dtype, or None."""
    B, _, _, D = queries.shape
    H = cache.n_kv_heads
    buf = cache.code_buffers()
    sink, window = cache.fp16_buffers()
    sk, sv, S = _fp16_inputs(sink, B, H, D)
    wk, wv, R = _fp16_inputs(window, B, H, D)
    z = _placeholder((B, H, 1, D))
    lens = mx.array([[buf.length, S, R, 0]], mx.int32)
    fp = ((sk, sv), (wk, wv), (z, z))
    first, last, _ = cache.code_span()
    return decode_on_kernels(
        queries, scale, sinks, cache.k_codec, cache.v_codec, buf, fp, lens, buf.length, first, last, cache.ring_slots()
    )


def _rope_term(ck, queries, scale, G, first, last, front):
    """RoPE-centred keys: tq_rope_bias's term for the blocks of positions first .. last (after the
    first ROPE_TILE blocks if `front`, a ring whose codes keep the first tokens), as (kf, block, first
    block); else (None, 0, 0)."""
    pairs = ck.kernel_pairs()
    if pairs is None:
        return None, 0, 0
    blk = ck.rope_block
    b0 = max(first // blk, K.ROPE_TILE) if front else first // blk
    nb = max(last // blk - b0 + 1, 0)
    return K.rope_bias(queries, scale, *pairs, b0, nb, blk, G, front), blk, b0


def decode_on_kernels(queries, scale, sinks, ck, cv, buf, fp, lens, T, first, last, ring=None):
    """tq_rope_bias (RoPE-centred keys) + tq_decode + tq_merge: queries (B, Hq, 1, D) against the codes in `buf`
    (CodeBuffers: full buffers), the fp tokens fp = ((sink k, v), (window k, v), (exact k, v)) (B, H, capacity,
    D) and per-row counts lens (B or 1, 4) [coded, sink, window, exact]; T: the most coded tokens of any row;
    first, last (RoPE-centred keys): every code slot's position is in first .. last (`code_span`), or one of a
    ring's front tokens (ring, RingSlots: where each slot sits in a ring; else at the row's sinks' count + the
    slot).  ck, cv: codecs whose constants are per head or per batch row.
    (B, Hq, 1, D) in queries.dtype, or None (kernel unusable)."""
    B, Hq, _, D = queries.shape
    G = Hq // buf.k["norm0"].shape[1]
    qmap, omap = ck.kernel_map("query"), cv.kernel_map("output")
    (sk, sv), (wk, wv), (ek, ev) = fp

    def run():
        front = ring is not None
        kf, rope_block, fb0 = _rope_term(ck, queries, scale, G, first, last, front)
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
            ek,
            ev,
            lens,
            T,
            G,
            kfmt=ck.kernel_format,
            vfmt=cv.kernel_format,
            rope=None if kf is None else (kf, rope_block, fb0, None if ring is None else ring.offsets(), front),
        )
        return K.merge(po, pm, pl, cv.kernel_mean_rot, omap, sinks, G, queries.dtype)

    key = (
        "decode",
        queries.dtype,
        buf.k["norm0"].dtype,
        ek.dtype,
        D,
        ck.kernel_format,
        cv.kernel_format,
        G,
        qmap.ndim,
        sinks is not None,
        ck.rope_block if ck.kernel_pairs() is not None else 0,
        ring is not None,
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
        for codec, enc in ((at(ck, cache.sink.length, cache.ring_slots()), buf.k), (cv, buf.v)):
            y = K.dequantize(
                enc["codes0"], enc["norm0"], codec.levels, buf.length, codec.d, dtype, fmt=codec.kernel_format
            )
            if codec.mean_rot is not None:
                y = (y.astype(mx.float32) + codec.mean_rot).astype(dtype)
            if isinstance(codec, AtPositions):  # RoPE-centred keys: the turned mean, by MLX ops (prefill)
                y = (y.astype(mx.float32) + codec.turned(buf.length)).astype(dtype)
            out.append(y)
        return out

    key = ("dequant", dtype, buf.k["norm0"].dtype, dk, ck.kernel_format, cv.kernel_format)
    coded = K.guarded(key, dequant)
    return None if coded is None else stored_domain_attention(cache, queries, scale, mask, sinks, coded)
