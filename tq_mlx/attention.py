"""Attention on a TurboQuantKVCache: the entry point, and the choice of path.

`attention(cache, queries, scale, mask, sinks)` is what mlx-lm's
`scaled_dot_product_attention` calls for our caches (see `tq_mlx.patch`).
With the Metal kernels enabled (`kernels.enabled()`: a Metal back-end, or
TQ_MLX_ATTENTION=metal) calls the kernels can serve go to `metal_attention`;
everything else goes to `reference_attention` (MLX ops), and the reason is
logged once on the "tq_mlx" logger.  TQ_MLX_ATTENTION=reference forces the
reference path.
"""

import logging

import mlx.core as mx

from . import kernels
from .fp16_codec import FP_KEY
from .metal_attention import kernel_decode, kernel_prefill
from .partials import group_queries
from .reference_attention import reference_attention

log = logging.getLogger("tq_mlx")
_LOGGED = set()


def _log_once(reason: str):
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.info("tq_mlx attention: reference path (%s)", reason)


def unsupported_reason(cache, queries, mask):
    """None when the kernel path serves this call, else a short reason."""
    coded = [b for b in cache.blocks() if not b.is_fp]
    if not coded:
        return "no coded tokens yet"
    if len(coded) > 1:
        return f"{len(coded)} coded blocks"
    b = coded[0]
    if b.k_codec.d != b.v_codec.d:
        return f"dk={b.k_codec.d} != dv={b.v_codec.d}"
    for part, c in (("K", b.k_codec), ("V", b.v_codec)):
        reason = c.kernel_reason()
        if reason is not None:
            return f"{part} codec: {reason}"
    if queries.shape[2] == 1 and mask is not None and not isinstance(mask, str):
        return "array mask at decode"
    return None


def attention(cache, queries, scale, mask=None, sinks=None, keys=None, values=None):
    """queries (B, Hq, L, dk) -> (B, Hq, L, dv) in queries.dtype.

    keys, values: what the model passed (None: the cache's own).  The arrays the cache handed out attend
    to the cache's blocks; the cache's keys passed as values too ("kk": MLA's latent attention) use the
    keys as values; arrays the model made itself (MLA's per-head keys in prefill) are attended as given."""
    L = queries.shape[2]
    role = "kv" if keys is None else cache.role(keys, values)
    if role is None:
        if not cache.empty():
            cache.prepare_attention(None, L)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    if cache.empty():
        cache.pending = False
        raise ValueError("attention on an empty TurboQuantKVCache: call update_and_fetch first")
    if role == "kv":
        cache.hands_out_all = False  # the model reads the cache through here: placeholders from now on
    kk = role == "kk"
    cache.check_queries(queries)
    early, n = _before_calibration(cache, queries, scale, mask, sinks, kk)
    cache.prepare_attention(group_queries(queries, cache.n_kv_heads, scale), L)
    if not cache.calibrated:  # the exact phase: as mlx-lm's fp cache, on the tokens as given
        (exact,) = cache.blocks(values_from_keys=kk)
        return mx.fast.scaled_dot_product_attention(
            queries, exact.k[FP_KEY], exact.v[FP_KEY], scale=scale, mask=mask, sinks=sinks
        )
    if early is None:
        return _on_codes(cache, queries, scale, mask, sinks, kk)
    if n == L:
        return early
    late = _on_codes(cache, queries[:, :, n:], scale, mask if isinstance(mask, str) else mask[..., n:, :], sinks, kk)
    return mx.concatenate([early, late], axis=2)


def _before_calibration(cache, queries, scale, mask, sinks, kk):
    """A call whose tokens complete the first quant_start: its queries at positions before quant_start,
    answered on the exact tokens as a call that ended there would have (a prompt's answer then does not
    depend on how it was chunked, and a prefix cache is exact): (out, n) for the first n queries, or
    (None, 0) (other calls; sliding-window and chunked layers, whose exact tokens may not be in position
    order; several queries and no mask)."""
    L = queries.shape[2]
    Q, first = cache._quant_start, cache.offset - L
    if cache.calibrated or first >= Q or cache.offset < max(Q, 1):
        return None, 0
    if cache.max_size is not None or cache.chunk_size is not None or (mask is None and L > 1):
        return None, 0
    n = Q - first
    (exact,) = cache.blocks(values_from_keys=kk)
    k, v = exact.k[FP_KEY][:, :, :Q], exact.v[FP_KEY][:, :, :Q]
    m = mask if mask is None or isinstance(mask, str) else mask[..., :n, :Q]
    return mx.fast.scaled_dot_product_attention(queries[:, :, :n], k, v, scale=scale, mask=m, sinks=sinks), n


def _on_codes(cache, queries, scale, mask, sinks, kk):
    """Attention of a calibrated cache: the kernels where they serve the call, else the reference path."""
    L = queries.shape[2]
    if L == 1 and mask is not None and not isinstance(mask, str):
        cache.linearize()  # a positional mask at decode reads the tokens in temporal order
    reason = "not enabled" if not kernels.enabled() else "the keys serve as values" if kk else None
    reason = reason or unsupported_reason(cache, queries, mask)
    if reason is not None:
        if reason != "not enabled":
            _log_once(reason)
        return reference_attention(cache, queries, scale, mask, sinks, values_from_keys=kk)
    out = kernel_decode(cache, queries, scale, sinks) if L == 1 else kernel_prefill(cache, queries, scale, mask, sinks)
    return reference_attention(cache, queries, scale, mask, sinks) if out is None else out
