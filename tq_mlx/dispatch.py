"""Choose the attention implementation for a TurboQuantKVCache call.

TQ_MLX_ATTENTION selects it: "auto" (default) uses the Metal kernels of
`tq_mlx.kernels` when MLX has a Metal back-end and the reference path (MLX
ops, `tq_mlx.attention.reference_attention`) otherwise; "reference" forces the
reference path; "metal" forces the kernel path (on a machine without Metal it
only works under an emulator such as metal_emu's `patched_mlx()`).

Kernel path, for caches whose K and V codecs are both plain TurboQuant (one
segment, no QJL, 1..8 bits, float16/float32 norms, head_dim in 64, 80, 96,
128, 256, dk == dv):
- decode (L = 1, mask None or "causal"): `kernels.decode_attention` on the
  packed codes (single pass, or split-K + merge for long contexts), merged on
  the host with the cache's fp16 parts (window, fp16 sink tokens) and the
  attention sinks through (max, sum-exp);
- prefill (L > 1): the codes are dequantized into the rotated domain with
  `kernels.dequantize` (float16; float32 for float32 models), the fp16 parts
  are rotated, and
  mx.fast.scaled_dot_product_attention runs on rotated q/k/v for this layer.
Query-weighted key codecs (weights w, or a whitening matrix A) need no kernel
change: the codec rotates the query as R (q / w) (R A^-T q) and the window keys
as R (w k) (R A k).
A centred codec's mean is added back on the host (decode: score shift and
sum-exp times the mean; prefill: added to the dequantized tensors).
Everything else (outlier split, QJL, HQMQ, fp16 codecs, other head dims, an
array mask at decode) takes the reference path; the reason is logged once
on the "tq_mlx" logger.  A cache holding only fp16 tokens uses
mx.fast.scaled_dot_product_attention / plain MLX math on the window.
"""

import logging
import os

import mlx.core as mx

from . import kernels as K
from .attention import reference_attention
from .affine_segment import AffineSegment
from .turboquant import TurboQuant

log = logging.getLogger("tq_mlx")
_LOGGED = set()
MODES = ("auto", "reference", "metal")


def _log_once(reason: str):
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.info("tq_mlx attention: reference path (%s)", reason)


def mode() -> str:
    m = os.environ.get("TQ_MLX_ATTENTION", "auto")
    if m not in MODES:
        raise ValueError("TQ_MLX_ATTENTION must be 'auto', 'reference' or 'metal'")
    return m


def kernels_enabled() -> bool:
    """True when the Metal kernels serve this process: TQ_MLX_ATTENTION=metal, or auto with a Metal back-end."""
    m = mode()
    return m == "metal" or (m == "auto" and mx.metal.is_available())


def _is_fp(enc) -> bool:
    return "x" in enc  # Float16Codec parts (fp16 window, fp16 sink tokens) store the raw vectors as "x"


def unsupported_reason(cache, queries, mask):
    """None when the kernel path handles this call, else a short reason."""
    _, H, dk, dv = cache.shape
    if queries.shape[1] % H:
        return f"{queries.shape[1]} query heads not a multiple of {H} KV heads"
    coded = [(ck, cv) for ck, cv, ek, _ in cache.parts() if not _is_fp(ek)]
    if not coded:
        return None  # fp16 tokens only
    if len(coded) > 1:
        return f"{len(coded)} coded blocks"
    if dk != dv:
        return f"dk={dk} != dv={dv}"
    if dk not in K.SUPPORTED_D:
        return f"head_dim {dk} not in {K.SUPPORTED_D}"
    for part, c in zip("KV", coded[0]):
        if not isinstance(c, TurboQuant):
            return f"{part} codec {type(c).__name__} has no kernel"
        if len(c.segments) != 1:
            return f"{part} codec has {len(c.segments)} segments (outlier split)"
        seg = c.segments[0]
        if isinstance(seg, AffineSegment):
            return f"{part} codec uses the uniform grid (MLX's quantized kernels serve it)"
        if seg.qjl:
            return f"{part} codec uses QJL"
        if not 1 <= seg.mse_bits <= K.MAX_BITS:
            return f"{part} codec has {seg.mse_bits} bits"
        if c.norm_dtype not in (mx.float16, mx.float32):
            return f"{part} norms are {c.norm_dtype}"
    if queries.shape[2] == 1 and mask is not None and not isinstance(mask, str):
        return "array mask at decode"
    return None


def attention(cache, queries, scale, mask=None, sinks=None):
    """queries (B, Hq, L, dk) -> (B, Hq, L, dv); consumes the cache's pending update."""
    cache.pending = False
    if cache.empty():
        raise ValueError("attention on an empty TurboQuantKVCache: call update_and_fetch first")
    if not kernels_enabled():
        return reference_attention(cache, queries, scale, mask, sinks)
    B, Hq, L, dk = queries.shape  # deferred encoding (query-calibrated key codecs), as the reference does
    H = cache.shape[1]
    if Hq % H == 0:
        cache.encode_pending((queries.astype(mx.float32) * scale).reshape(B, H, (Hq // H) * L, dk))
    reason = unsupported_reason(cache, queries, mask)
    if reason is not None:
        _log_once(reason)
        return reference_attention(cache, queries, scale, mask, sinks)
    if queries.shape[2] == 1:
        return kernel_decode(cache, queries, scale, sinks)
    # float32 models (the CPU) keep float32 rotated K/V; fp16/bf16 models get float16 (one layer at a time)
    return kernel_prefill(cache, queries, scale, mask, sinks,
                          dtype=mx.float32 if queries.dtype == mx.float32 else mx.float16)


def _mean_rot(codec):
    """The codec's rotated centring mean (1, H, 1, d), or None."""
    return getattr(codec, "_mean_rot", None)


def _rotate_data(codec, x):
    """Stored-domain image of raw fp vectors x (B, H, n, d): R (w * x), or R A x for a whitening
    matrix (no centring: the window is raw)."""
    return codec.rotation.forward(codec._weigh(x.astype(mx.float32)))


def _arrays(cache, ek, ev):
    """(T, kc, kn, vc, vn) for the coded block: the store's full capacity buffers when they are what
    the view slices (no copy of the cache per step), else the views themselves."""
    T = ek["codes0"].shape[2]
    store = getattr(cache, "codes", None)
    bufs = getattr(store, "buffers", {})
    names = ("k_codes0", "k_norm0", "v_codes0", "v_norm0")
    if getattr(store, "length", -1) == T and all(n in bufs for n in names):
        return (T, *(bufs[n] for n in names))
    return T, ek["codes0"], ek["norm0"], ev["codes0"], ev["norm0"]


def kernel_decode(cache, queries, scale, sinks=None, force_blocks=None):
    """L = 1: kernel over the codes, host merge with the fp16 parts and sinks by (max, sum-exp)."""
    B, Hq, _, dk = queries.shape
    _, H, _, dv = cache.shape
    G = Hq // H
    q = (queries.astype(mx.float32) * scale).reshape(B, H, G, dk)
    terms = []  # (o (B, H, G, dv) un-normalised, m, l (B, H, G), codec to unrotate o or None)
    for ck, cv, ek, ev in cache.parts():
        if _is_fp(ek):
            s = q @ mx.swapaxes(ek["x"].astype(mx.float32), -1, -2)  # (B, H, G, n)
            mw = s.max(axis=-1)
            p = mx.exp(s - mw[..., None])
            terms.append((p @ ev["x"].astype(mx.float32), mw, p.sum(axis=-1), None))
            continue
        T, kc, kn, vc, vn = _arrays(cache, ek, ev)
        qr = ck.rotate_query(q).reshape(B * H, G, dk)
        o, mm, ll = K.decode_attention(qr, kc, kn, vc, vn, ck.segments[0].levels, cv.segments[0].levels, T,
                                       force_blocks=force_blocks)
        o, mm, ll = o.reshape(B, H, G, dv), mm.reshape(B, H, G), ll.reshape(B, H, G)
        mk, mv = _mean_rot(ck), _mean_rot(cv)
        if mk is not None:  # centred keys: every coded score gains <R q, R mean_k>
            mm = mm + (qr.reshape(B, H, G, dk) * mk).sum(axis=-1)
        if mv is not None:  # centred values: sum_t p_t (y_t + R mean_v)
            o = o + ll[..., None] * mv
        terms.append((o, mm, ll, cv))
    if sinks is not None:
        sk = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, H, G), (B, H, G))
        terms.append((None, sk, mx.ones_like(sk), None))
    M = terms[0][1]
    for t in terms[1:]:
        M = mx.maximum(M, t[1])
    num, den = 0.0, 0.0
    for o, mt, lt, codec in terms:
        f = mx.exp(mt - M)
        den = den + lt * f
        if o is not None:
            o = o * f[..., None]
            num = num + (codec.unrotate(o) if codec is not None else o)
    out = num / den[..., None]
    return out.reshape(B, Hq, 1, dv).astype(queries.dtype)


def kernel_prefill(cache, queries, scale, mask=None, sinks=None, dtype=mx.float16):
    """L > 1: mx.fast.scaled_dot_product_attention on this layer's rotated (dequantized) q/k/v."""
    B, Hq, L, dk = queries.shape
    _, H, _, dv = cache.shape
    G = Hq // H
    parts = cache.parts()
    sinks = None if sinks is None else sinks.astype(dtype)
    coded = [(ck, cv) for ck, cv, ek, _ in parts if not _is_fp(ek)]
    if not coded:  # fp16 tokens only: attention in the original domain
        k = mx.concatenate([ek["x"] for _, _, ek, _ in parts], axis=2).astype(dtype)
        v = mx.concatenate([ev["x"] for _, _, _, ev in parts], axis=2).astype(dtype)
        o = mx.fast.scaled_dot_product_attention(queries.astype(dtype), k, v, scale=scale, mask=mask, sinks=sinks)
        return o.astype(queries.dtype)
    ck, cv = coded[0]
    ks, vs = [], []  # temporal order, all in the stored (rotated, weighted) domain
    for _, _, ek, ev in parts:
        if _is_fp(ek):
            ks.append(_rotate_data(ck, ek["x"]).astype(dtype))
            vs.append(_rotate_data(cv, ev["x"]).astype(dtype))
            continue
        T, kc, kn, vc, vn = _arrays(cache, ek, ev)
        for xs, codec, c, n, d in ((ks, ck, kc, kn, dk), (vs, cv, vc, vn, dv)):
            y = K.dequantize(c, n, codec.segments[0].levels, T, d, dtype)
            mr = _mean_rot(codec)
            xs.append(y if mr is None else (y.astype(mx.float32) + mr).astype(dtype))
    k = ks[0] if len(ks) == 1 else mx.concatenate(ks, axis=2)
    v = vs[0] if len(vs) == 1 else mx.concatenate(vs, axis=2)
    q = ck.rotate_query(queries.reshape(B, H, G * L, dk)).reshape(B, Hq, L, dk).astype(dtype)
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    o = cv.unrotate(o.astype(mx.float32).reshape(B, H, G * L, dv))
    return o.reshape(B, Hq, L, dv).astype(queries.dtype)
