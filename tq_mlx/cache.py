"""TurboQuantKVCache: a drop-in mlx-lm prompt cache that stores codes, not fp tensors.

Life of a token.  `update_and_fetch(keys, values)` gets (B, H, L, d) arrays and
returns them unchanged as placeholders: attention (`tq_mlx.attention`, installed
into mlx-lm by `tq_mlx.patch`) reads the cache's blocks instead.
1. The first update fixes the cache's shape (B, H, dk, dv); there are no codecs yet.
2. Tokens wait in float16 in the `fp` store until the codecs can be built: the
   key codec learns channel weights from queries (`codec_factory.needs_queries`),
   so it is built at the first attention call (`prepare_attention`) from the
   waiting keys and that call's queries; other codecs are built at once.
3. With codecs, every token beyond the fp16 budget (the first `fp_sink` tokens
   in the `sink` store, the newest `fp_window` in `fp`, everything while the
   cache holds fewer than `quant_start`) is encoded into the `codes` store; a
   decode step's token goes straight to codes.
4. Each update sets `pending`; attention clears it.  An update that finds it
   still set means the model bypassed our attention (it would have attended to
   the placeholders): it raises instead of returning wrong text.
Attention sees `blocks()`: sinks, codes, window, in temporal order.  With
`max_size` the cache is a sliding window with mlx-lm's RotatingKVCache
semantics (temporal order, `keep` first tokens).
"""

import json
from typing import NamedTuple

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from . import kernels
from .cache_state import STATE_VERSION, prefixed, restore
from .codec import check_input
from .codec_factory import Calibration, build_codec, needs_queries
from .config import CacheConfig, resolve_config
from .fp16_codec import FP16, FP_KEY
from .store import TokenStore


class Block(NamedTuple):
    """A run of tokens in one format: k, v are encodings (dicts of (B, H, n, ...) arrays) read by the codecs;
    fp16 blocks hold {"x": float16 (B, H, n, d)}."""

    k_codec: object
    v_codec: object
    k: dict
    v: dict
    is_fp: bool
    length: int


class CodeBuffers(NamedTuple):
    """The codes store's full-capacity buffers (kernels read the first `length` tokens, no copy)."""

    length: int
    k: dict
    v: dict


def _fp_block(view: dict, n: int) -> Block:
    return Block(FP16, FP16, {FP_KEY: view["k"]}, {FP_KEY: view["v"]}, True, n)


class TurboQuantKVCache(_BaseCache):
    """KV cache for one attention layer; keys/values arrive as (B, H, L, d) arrays.

    kv_heads, head_dims: what the model's layer produces ((dk, dv)), when known: other shapes are refused.
    """

    def __init__(self, config=None, layer: int = 0, max_size=None, keep: int = 0, kv_heads=None, head_dims=None):
        self.config: CacheConfig = resolve_config(config)
        self.layer = layer
        self.max_size = max_size
        self.keep = keep
        self.expect = (kv_heads, *(head_dims or (None, None)))
        self.offset = 0
        self._clear()

    def _clear(self):
        self.shape = None  # (B, H, dk, dv)
        self.k_codec = self.v_codec = None
        self.calibration_length = 0  # tokens held when the codecs were calibrated (0: not yet)
        self.codes = TokenStore()  # "k_*" and "v_*" encodings
        self.fp = TokenStore()  # "k", "v" float16 tokens waiting for codecs, or the recent window
        self.sink = TokenStore(step=1)  # "k", "v" float16 first tokens (attention sinks), exact size
        self.pending = False  # set by update, cleared by attention: catches models that bypass it

    @property
    def n_kv_heads(self) -> int:
        return self.shape[1]

    def check_queries(self, queries):
        """Refuse queries that do not fit this cache: (B, Hq, L, dk) with Hq a multiple of H."""
        b, hq, _, dk = queries.shape
        want_b, h, want_dk, _ = self.shape
        if hq % h or dk != want_dk or b != want_b:
            raise ValueError(
                f"queries {tuple(queries.shape)} do not fit this cache (batch {want_b}, {h} KV "
                f"heads of size {want_dk}): a cache made for another model?"
            )

    # ---- storage -------------------------------------------------------
    def _build_codecs(self, keys=None, values=None, state=None, queries=None):
        cfg, (_, h, dk, dv) = self.config, self.shape
        state, use = state or {}, kernels.enabled()
        self.k_codec = build_codec(
            cfg.keys, cfg, dk, h, self.layer, "k", Calibration(keys, queries, prefixed(state, "k_")), use
        )
        self.v_codec = build_codec(
            cfg.values, cfg, dv, h, self.layer, "v", Calibration(values, None, prefixed(state, "v_")), use
        )

    def _waiting_for_queries(self) -> bool:
        return self.k_codec is None and needs_queries(self.config.keys, "k")

    def prepare_attention(self, queries):
        """Called by attention with the grouped queries (B, H, M, dk): clears `pending` and encodes the
        tokens beyond the fp16 budget (building the codecs from these queries the first time)."""
        self.pending = False
        move = self.fp.length - self._fp_budget(self._held())
        if move > 0:
            self._encode(self.fp.take_front(move), queries)

    def _encode(self, front: dict, queries=None):
        """Store float16 tokens {"k", "v"} (B, H, n, d), oldest first: sinks first, the rest as codes."""
        room = 0 if self.max_size is not None else self.config.fp_sink - self.sink.length
        if room > 0:
            self.sink.append({k: v[:, :, :room] for k, v in front.items()})
            front = {k: v[:, :, room:] for k, v in front.items()}
            if front["k"].shape[2] == 0:
                return
        keys, values = front["k"], front["v"]
        if self.k_codec is None:
            self._build_codecs(keys, values, queries=queries)
            self.calibration_length = self.offset
        enc = {f"k_{n}": a for n, a in self.k_codec.encode(keys).items()}
        enc.update({f"v_{n}": a for n, a in self.v_codec.encode(values).items()})
        self.codes.append(enc)

    def _fp_budget(self, total: int) -> int:
        cfg = self.config
        if total < cfg.quant_start:
            return total
        return min(cfg.fp_window, total)

    def _check(self, keys, values):
        if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"keys and values must be (B, H, L, d) with equal B, H, L; got {keys.shape} and {values.shape}"
            )
        if keys.dtype != values.dtype:
            raise TypeError(f"keys ({keys.dtype}) and values ({values.dtype}) must share a dtype")
        b, h, _, dk = keys.shape
        got = (b, h, dk, values.shape[-1])
        want_h, want_dk, want_dv = self.expect
        if (want_h is not None and h != want_h) or (want_dk is not None and (dk, got[3]) != (want_dk, want_dv)):
            raise ValueError(
                f"layer {self.layer} of this model has {want_h} KV heads of sizes (dk, dv) = "
                f"({want_dk}, {want_dv}); got keys {keys.shape}, values {values.shape}: a cache made "
                "for another model?"
            )
        if self.shape is None:
            self.shape = got
        elif got != self.shape:
            raise ValueError(
                f"this cache holds (B, H, dk, dv) = {self.shape}; got keys {keys.shape}, "
                f"values {values.shape}: a cache made for another model?"
            )
        check_input(keys, dk, "keys")
        check_input(values, values.shape[-1], "values")

    def _drop_front(self, n: int):
        """Sliding window: forget n tokens after the first `keep` (oldest first)."""
        if n <= 0:
            return
        start, nc = min(self.keep, self._held()), self.codes.length
        from_codes = max(0, min(n, nc - start))
        self.codes.remove(start, from_codes)
        self.fp.remove(max(0, start - nc), n - from_codes)

    def update_and_fetch(self, keys, values):
        """Store new (B, H, L, d) keys/values; returns them as placeholders (attention reads the codes)."""
        if self.pending:
            raise RuntimeError(
                "the previous attention call on this TurboQuantKVCache did not go through tq_mlx's attention: "
                "the model bypasses mlx_lm.models.base.scaled_dot_product_attention (e.g. calls "
                "mx.fast.scaled_dot_product_attention directly), which TurboQuant caches do not support"
            )
        self._check(keys, values)
        n = keys.shape[2]
        if self.max_size is not None:
            held = self._held()
            self._drop_front(held + n - self.max_size if n == 1 else held - self.max_size + 1)
        new = {"k": keys.astype(mx.float16), "v": values.astype(mx.float16)}
        self.offset += n
        if self.fp.length == 0 and not self._waiting_for_queries() and self._fp_budget(self._held() + n) == 0:
            self._encode(new)  # the usual decode step: straight to codes, no trip through the fp store
        else:
            self.fp.append(new)
            if not self._waiting_for_queries():
                move = self.fp.length - self._fp_budget(self._held())
                if move > 0:
                    self._encode(self.fp.take_front(move))
        self.pending = True
        return keys, values

    # ---- what attention reads -----------------------------------------
    def blocks(self):
        """The tokens as Blocks in temporal order: fp16 sinks, codes, then the fp16 window."""
        out = []
        if self.sink.length:
            out.append(_fp_block(self.sink.view(), self.sink.length))
        if self.codes.length:
            view = self.codes.view()
            out.append(
                Block(self.k_codec, self.v_codec, prefixed(view, "k_"), prefixed(view, "v_"), False, self.codes.length)
            )
        if self.fp.length:
            out.append(_fp_block(self.fp.view(), self.fp.length))
        return out

    def code_buffers(self) -> CodeBuffers:
        """The codes store's full-capacity buffers (no slicing: the kernels read the first `length`)."""
        bufs = self.codes.buffers
        return CodeBuffers(self.codes.length, prefixed(bufs, "k_"), prefixed(bufs, "v_"))

    # ---- mlx-lm protocol ----------------------------------------------
    def _held(self) -> int:
        return self.sink.length + self.codes.length + self.fp.length

    def size(self) -> int:
        """Tokens in context, as mlx-lm counts them (a sliding window reports at most max_size)."""
        return self._held() if self.max_size is None else min(self.offset, self.max_size)

    def empty(self) -> bool:
        return self._held() == 0

    def is_trimmable(self) -> bool:
        return self.max_size is None or self.offset < self.max_size

    def trim(self, n: int) -> int:
        n = min(self.offset, n, self._held())
        from_fp = min(n, self.fp.length)
        self.fp.trim_back(from_fp)
        from_codes = min(n - from_fp, self.codes.length)
        self.codes.trim_back(from_codes)
        self.sink.trim_back(n - from_fp - from_codes)
        self.offset -= n
        self.pending = False
        return n

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        if self.max_size is None:
            return create_attention_mask(N, self._held(), return_array, window_size)
        if N > 1:
            window_size = window_size or self.max_size
            offset = min(self.max_size - 1, self._held())
            if offset + N > window_size or return_array:
                return create_causal_mask(N, offset, window_size=window_size)
            return "causal"
        if window_size is None or window_size >= self.max_size:
            return None
        t = min(self._held() + 1, self.max_size)
        return mx.arange(t) >= t - window_size

    @property
    def nbytes(self) -> int:
        """Bytes really held: codes and norms (with capacity), fp16 sinks and window, and the codecs'
        per-head constants (rotation signs or matrices, learnt means, weights, channel orders)."""
        side = sum(c.side_nbytes for c in (self.k_codec, self.v_codec) if c is not None)
        return self.sink.nbytes + self.codes.nbytes + self.fp.nbytes + side

    def _calibration(self) -> dict:
        out = {}
        for p, c in (("k", self.k_codec), ("v", self.v_codec)):
            if c is not None:
                out.update({f"{p}_{n}": a for n, a in c.calibration_state().items()})
        return out

    @property
    def state(self):
        meta = {
            "version": STATE_VERSION,
            "config": json.loads(self.config.to_json()),
            "layer": self.layer,
            "offset": self.offset,
            "max_size": self.max_size,
            "keep": self.keep,
            "shape": self.shape,
            "expect": self.expect,
            "calibration_length": self.calibration_length,
            "n_codes": self.codes.length,
            "n_fp": self.fp.length,
            "n_sink": self.sink.length,
        }
        st = {"tq_meta": json.dumps(meta)}
        st.update({f"codes_{k}": v for k, v in self.codes.view().items()})
        st.update({f"fp_{k}": v for k, v in self.fp.view().items()})
        st.update({f"sink_{k}": v for k, v in self.sink.view().items()})
        st.update({f"calib_{k}": v for k, v in self._calibration().items()})
        return st

    @state.setter
    def state(self, st):
        restore(self, st)

    def __deepcopy__(self, memo):
        new = TurboQuantKVCache.__new__(TurboQuantKVCache)
        new.__dict__.update(self.__dict__)
        new.codes, new.fp, new.sink = self.codes.copy(), self.fp.copy(), self.sink.copy()
        return new
