"""Attention on a BatchTurboQuantKVCache: each sequence attends to its own tokens, as it would alone.

- Prefill (the update stored several tokens): one row at a time through `attention.attention` on
  that row, the single cache's own path (the exact phase's SDPA, or the codes dequantized and SDPA,
  on the kernels or MLX ops), with the mask the row would get alone; padding positions get zeros.
- Decode (one token per row), all rows at once:
  * every row still exact: mx.fast.scaled_dot_product_attention on the exact store, each row masked
    to its own length (what mlx-lm's batch cache computes);
  * the Metal kernels (`metal_attention.decode_on_kernels`): tq_decode + tq_merge for the batch, each
    row's token counts and codec constants read inside (rows still exact are read there too);
  * else the reference path: one float32 softmax over every store's slots, each row's slots past its
    count masked out.
The model's mask must be a batch mask (mlx-lm's or `make_mask`'s: causal, padding, sliding window):
each row's own is rebuilt from its counts; any other mask is refused.
"""

import mlx.core as mx

from . import kernels
from .attention import _before_calibration, _log_once, attention
from .batch_cache import _MASKS
from .cache import CodeBuffers
from .cache_state import prefixed
from .fp16_codec import FP16
from .metal_attention import _placeholder, decode_on_kernels
from .partials import group_queries, sink_partial, ungroup
from .rope_mean import RingSlots, at


def batch_attention(batch, queries, scale, mask=None, sinks=None, keys=None, values=None):
    """queries (B, Hq, L, dk) -> (B, Hq, L, dv) in queries.dtype; keys/values: what the model passed."""
    if keys is not None and (keys is not batch.handed[0] or values is not batch.handed[1]):
        raise NotImplementedError(
            f"layer {batch.layer}: the model attends on keys/values other than those the batch cache handed out "
            "(KV sharing, latent attention or a hand-made transform): TurboQuant batch caches do not serve it; "
            "run the sequences one at a time"
        )
    if batch.empty():
        raise ValueError("attention on an empty batch cache: call update_and_fetch first")
    window_size, return_array = _mask_settings(batch, mask, queries)
    if batch.chunk is not None:
        return _prefill(batch, queries, scale, sinks, window_size, return_array)
    if window_size is not None and batch.max_size is not None and window_size < batch.max_size:
        raise NotImplementedError("a window smaller than a batch cache's sliding window at decode is not supported")
    return _decode(batch, queries, scale, sinks)


def _mask_settings(batch, mask, queries):
    """(window_size, return_array) of the model's mask: a batch mask is recognised, anything else refused."""
    if mask is None or (isinstance(mask, str) and mask == "causal"):
        return None, False
    entry = _MASKS.get(id(mask))
    if entry is not None and entry[0] is mask:
        return entry[1], entry[2]
    B, _, L, _ = queries.shape
    if (
        isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.ndim == 4
        and mask.shape[:3]
        in (
            (B, 1, L),
            (1, 1, L),
        )
    ):
        return None, False  # a batch mask of mlx-lm's own caches (boundary layers): causal and padding
    raise ValueError(
        f"layer {batch.layer}: a TurboQuant batch cache takes mlx-lm's batch masks (causal, padding, sliding "
        f"window); got {mask if isinstance(mask, str) else (mask.dtype, tuple(mask.shape))}"
    )


def _prefill(batch, queries, scale, sinks, window_size, return_array):
    B, Hq, L, _ = queries.shape
    dv = batch.shape[2]
    outs = []
    for r, (s, n, held) in zip(batch.rows, batch.chunk):
        parts = [mx.zeros((1, Hq, s, dv), queries.dtype)] if s else []
        if n:
            m = r.mask_for(n, held, return_array, window_size)
            parts.append(attention(r, queries[r.index : r.index + 1, :, s : s + n], scale, m, sinks))
        if L - s - n:
            parts.append(mx.zeros((1, Hq, L - s - n, dv), queries.dtype))
        outs.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2))
    return mx.concatenate(outs, axis=0)


def _decode(batch, queries, scale, sinks):
    out, early = _decode_rows(batch, queries, scale, sinks)
    if not early:
        return out
    rows = [early[b] if b in early else out[b : b + 1] for b in range(out.shape[0])]
    return mx.concatenate(rows, axis=0)


def _decode_rows(batch, queries, scale, sinks):
    """(output, {row: its output}): the rows whose token completes their first quant_start answer it on their
    exact tokens, as each would alone (`attention._before_calibration`)."""
    H = batch.n_kv_heads
    gq = group_queries(queries, H, scale)
    early = {}
    for r in batch.rows:  # the rows' query statistics and calibration, as each would alone
        if r.calibrated:
            r.pending = False
        else:
            out, n = _before_calibration(r, queries[r.index : r.index + 1], scale, None, sinks, False)
            if n:
                early[r.index] = out
            r.prepare_attention(gq[r.index : r.index + 1], 1)
    if not any(r.calibrated for r in batch.rows):
        return _exact_decode(batch, queries, scale, sinks), early
    if kernels.enabled():
        reason = unsupported_reason(batch)
        if reason is None:
            out = _kernel_decode(batch, queries, scale, sinks)
            if out is not None:
                return out, early
        else:
            _log_once(f"batch: {reason}")
    return reference_decode(batch, queries, scale, sinks), early


def _valid(st, T: int) -> mx.array:
    """(B, T) bool: which of a store's first T slots each row holds."""
    return mx.arange(T)[None] < mx.array(st.lengths, mx.int32)[:, None]


def _exact_decode(batch, queries, scale, sinks):
    st = batch.stores["exact"]
    T = st.longest
    k, v = st.buffers["k"][:, :, :T], st.buffers["v"][:, :, :T]
    mask = _valid(st, T)[:, None, None, :]
    return mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale, mask=mask, sinks=sinks)


def _blocks(batch):
    """(codec for K, codec for V, K encoding, V encoding, valid (B, T)) per non-empty store."""
    ck, cv = batch.codecs()
    out = []
    for name in ("exact", "sink", "codes", "window"):
        st = batch.stores[name]
        T = st.longest
        if T == 0:
            continue
        view = {n: a[:, :, :T] for n, a in st.buffers.items()}
        if name == "codes":
            kc = at(ck, [r.sink.length for r in batch.rows], ring_slots(batch), code_span(batch))
            out.append((kc, cv, prefixed(view, "k_"), prefixed(view, "v_"), _valid(st, T)))
        else:
            out.append((FP16, FP16, {"x": view["k"]}, {"x": view["v"]}, _valid(st, T)))
    return out


def ring_slots(batch):
    """RoPE-centred keys in rings: where each row's code slots sit in position (`TurboQuantKVCache.ring_slots`)."""
    rows = batch.rows
    if not rows or rows[0].max_size is None or getattr(batch.codecs()[0], "rope_map", None) is None:
        return None
    return RingSlots.of([(r.codes, r.next_position) for r in rows])


def code_span(batch):
    """(first, last, front) bounding the positions of every row's codes (`TurboQuantKVCache.code_span`)."""
    spans = [r.code_span() for r in batch.rows if r.calibrated and r.codes.length]
    if not spans:
        return 0, 0, 0
    return min(s[0] for s in spans), max(s[1] for s in spans), spans[0][2]


def reference_decode(batch, queries, scale, sinks=None):
    """One decode step of every row on MLX ops: (B, Hq, 1, dv) in queries.dtype."""
    B, Hq, _, _ = queries.shape
    H = batch.n_kv_heads
    G = Hq // H
    q = group_queries(queries, H, scale)
    blocks = _blocks(batch)
    scores = []
    for kc, _, k, _, valid in blocks:
        s = kc.scores(kc.rotate_query(q), k)
        scores.append(mx.where(valid[:, None, None, :], s, mx.array(-float("inf"), s.dtype)))
    s = mx.concatenate(scores, axis=-1)
    if sinks is not None:
        sk = sink_partial(sinks, B, H, 1).m.reshape(B, H, G, 1)
        p = mx.softmax(mx.concatenate([sk, s], axis=-1), axis=-1)[..., 1:]
    else:
        p = mx.softmax(s, axis=-1)
    out, start = 0.0, 0
    for _, vc, _, v, valid in blocks:
        n = valid.shape[1]
        out = out + vc.unrotate(vc.accumulate(p[..., start : start + n], v))
        start += n
    return ungroup(out, Hq, queries.dtype)


def unsupported_reason(batch):
    """None when the kernels serve this batch's decode step, else a short reason."""
    if batch.stores["codes"].longest == 0:
        return "no coded tokens yet"
    ck, cv = batch.codecs()
    if ck.d != cv.d:
        return f"dk={ck.d} != dv={cv.d}"
    for part, c in (("K", ck), ("V", cv)):
        reason = c.kernel_reason()
        if reason is not None:
            return f"{part} codec: {reason}"
    return None


def _fp_inputs(st, B, H, D):
    if not st.buffers:
        z = _placeholder((B, H, 1, D))
        return z, z
    return st.buffers["k"], st.buffers["v"]


def _kernel_decode(batch, queries, scale, sinks):
    B, _, _, D = queries.shape
    H = batch.n_kv_heads
    st = batch.stores
    codes = st["codes"]
    buf = CodeBuffers(codes.longest, prefixed(codes.buffers, "k_"), prefixed(codes.buffers, "v_"))
    fp = tuple(_fp_inputs(st[n], B, H, D) for n in ("sink", "window", "exact"))
    counts = [[st[n].lengths[b] for n in ("codes", "sink", "window", "exact")] for b in range(B)]
    lens = mx.array(counts, mx.int32)
    ck, cv = batch.codecs()
    first, last, _ = code_span(batch)
    return decode_on_kernels(
        queries, scale, sinks, ck, cv, buf, fp, lens, codes.longest, first, last, ring_slots(batch)
    )
