"""TurboQuantKVCache: a drop-in mlx-lm prompt cache that stores codes, not fp tensors.

Tokens live in two TokenStores in temporal order: the encoded older tokens
(codes, norms, ...) and, optionally, the newest `fp_window` tokens in float16.
`update_and_fetch` returns the new keys and values only as placeholders;
attention runs on the stored codes through `tq_mlx.attention` (installed into
mlx-lm by `tq_mlx.patch`).  With `max_size` the cache is a sliding window
with mlx-lm's RotatingKVCache semantics (temporal order, `keep` first tokens).
"""

import json

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from .codec_factory import FP16, build_codec, calibration_state
from .config import CacheConfig, resolve_config
from .store import TokenStore
from .turboquant import check_input

STATE_VERSION = 1


class CacheStateError(ValueError):
    """A saved cache state that is corrupt, from another version, or from another config/model."""


def _prefixed(d: dict, prefix: str) -> dict:
    """The entries of d whose key starts with prefix, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


class TurboQuantKVCache(_BaseCache):
    """KV cache for one attention layer; keys/values arrive as (B, H, L, d) arrays."""

    def __init__(self, config=None, layer: int = 0, max_size=None, keep: int = 0):
        self.config: CacheConfig = resolve_config(config)
        self.layer = layer
        self.max_size = max_size
        self.keep = keep
        self.offset = 0
        self._clear()

    def _clear(self):
        self.shape = None  # (B, H, k_dim, v_dim)
        self.k_codec = self.v_codec = None
        self.codes = TokenStore()  # "k_*" and "v_*" encoded arrays
        self.fp = TokenStore()  # "k", "v" float16 recent tokens
        self.sink = TokenStore(step=1)  # "k", "v" float16 first tokens (attention sinks), exact size
        self.pending = False  # set by update, cleared by attention: catches models that bypass it

    # ---- storage -------------------------------------------------------
    def _build_codecs(self, keys, values, calib=None, queries=None):
        cfg, (_, h, dk, dv) = self.config, self.shape
        calib = calib or {}
        self.k_codec = build_codec(cfg.keys, cfg, dk, h, self.layer, "k", keys, _prefixed(calib, "k_"), queries)
        self.v_codec = build_codec(cfg.values, cfg, dv, h, self.layer, "v", values, _prefixed(calib, "v_"))

    def _needs_queries(self) -> bool:
        """Key codecs calibrated on queries are built at the first attention call, not at update."""
        spec = self.config.keys
        return self.k_codec is None and spec.codec == "turboquant" and spec.query_weighting

    def encode_pending(self, queries=None):
        """Move tokens beyond the fp16 budget from the fp store into codes.

        queries: (B, H, M, dk) grouped per KV head, used once to calibrate the key codec.
        """
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
        # already validated by update_and_fetch
        enc = {f"k_{n}": a for n, a in self.k_codec.encode(keys, "keys", validate=False).items()}
        enc.update({f"v_{n}": a for n, a in self.v_codec.encode(values, "values", validate=False).items()})
        self.codes.append(enc)

    def _fp_budget(self, total: int) -> int:
        cfg = self.config
        if total < cfg.quant_start:
            return total
        return min(cfg.fp_window, total)

    def _check(self, keys, values):
        if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
            raise ValueError(f"keys and values must be (B, H, L, d) with equal B, H, L; got {keys.shape} and {values.shape}")
        if keys.dtype != values.dtype:
            raise TypeError(f"keys ({keys.dtype}) and values ({values.dtype}) must share a dtype")
        b, h, _, dk = keys.shape
        if self.shape is None:
            self.shape = (b, h, dk, values.shape[-1])
        elif (b, h, dk, values.shape[-1]) != self.shape:
            raise ValueError(f"this cache holds (B, H, dk, dv) = {self.shape}; got keys {keys.shape}, values {values.shape}")
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
        if self.fp.length == 0 and not self._needs_queries() and self._fp_budget(self._held() + n) == 0:
            self._encode(new)  # the usual decode step: straight to codes, no trip through the fp store
        else:
            self.fp.append(new)
            if not self._needs_queries():
                self.encode_pending()
        self.offset += n
        self.pending = True
        return keys, values

    # ---- what attention reads -----------------------------------------
    def parts(self):
        """(codec_k, codec_v, enc_k, enc_v) blocks in temporal order: sinks, codes, then the fp16 window."""
        out = []
        if self.sink.length:
            view = self.sink.view()
            out.append((FP16, FP16, {"x": view["k"]}, {"x": view["v"]}))
        if self.codes.length:
            view = self.codes.view()
            out.append((self.k_codec, self.v_codec, _prefixed(view, "k_"), _prefixed(view, "v_")))
        if self.fp.length:
            view = self.fp.view()
            out.append((FP16, FP16, {"x": view["k"]}, {"x": view["v"]}))
        return out

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
        side = sum(getattr(c, "side_nbytes", 0) for c in (self.k_codec, self.v_codec) if c is not None)
        return self.sink.nbytes + self.codes.nbytes + self.fp.nbytes + side

    def _calibration(self) -> dict:
        out = {}
        for p, c in (("k", self.k_codec), ("v", self.v_codec)):
            out.update({f"{p}_{n}": a for n, a in calibration_state(c).items()})
        return out

    @property
    def state(self):
        meta = {
            "version": STATE_VERSION, "config": json.loads(self.config.to_json()), "layer": self.layer,
            "offset": self.offset, "max_size": self.max_size, "keep": self.keep, "shape": self.shape,
            "n_codes": self.codes.length, "n_fp": self.fp.length, "n_sink": self.sink.length,
        }
        st = {"tq_meta": json.dumps(meta)}
        st.update({f"codes_{k}": v for k, v in self.codes.view().items()})
        st.update({f"fp_{k}": v for k, v in self.fp.view().items()})
        st.update({f"sink_{k}": v for k, v in self.sink.view().items()})
        st.update({f"calib_{k}": v for k, v in self._calibration().items()})
        return st

    @state.setter
    def state(self, st):
        try:
            meta = json.loads(st["tq_meta"])
            version = meta["version"]
        except Exception as e:
            raise CacheStateError(f"not a TurboQuantKVCache state (missing or corrupt 'tq_meta'): {e}") from None
        if version != STATE_VERSION:
            raise CacheStateError(f"TurboQuantKVCache state version {version} is not supported (expected {STATE_VERSION})")
        try:
            self.config = CacheConfig.from_json(json.dumps(meta["config"]))
        except Exception as e:
            raise CacheStateError(f"corrupt cache config in state: {e}") from None
        self.layer, self.offset = meta["layer"], meta["offset"]
        self.max_size, self.keep = meta["max_size"], meta["keep"]
        self._clear()
        self.shape = tuple(meta["shape"]) if meta["shape"] else None
        codes, fp, sink, calib = (_prefixed(st, p) for p in ("codes_", "fp_", "sink_", "calib_"))
        for name, store, n in (("codes", codes, meta["n_codes"]), ("fp16 window", fp, meta["n_fp"]),
                               ("fp16 sinks", sink, meta["n_sink"])):
            bad = [k for k, v in store.items() if not isinstance(v, mx.array) or v.ndim < 3 or v.shape[2] != n]
            if bad or (n and not store):
                raise CacheStateError(f"corrupt cache state: {name} arrays {bad or 'missing'} do not hold {n} tokens")
        self.codes.load(codes)
        self.fp.load(fp)
        self.sink.load(sink)
        if self.shape is not None and meta["n_codes"]:
            self._build_codecs(None, None, calib)

    def __deepcopy__(self, memo):
        new = TurboQuantKVCache.__new__(TurboQuantKVCache)
        new.__dict__.update(self.__dict__)
        new.codes, new.fp, new.sink = self.codes.copy(), self.fp.copy(), self.sink.copy()
        return new
