"""TurboQuantKVCache: a drop-in mlx-lm prompt cache that stores codes, not fp tensors.

Life of a token.  `update_and_fetch(keys, values)` gets (B, H, L, d) arrays and
returns them unchanged as placeholders: attention (`tq_mlx.attention`, installed
into mlx-lm by `tq_mlx.patch`) reads the cache's blocks instead.
1. Exact phase.  Until the cache first holds `quant_start` tokens, tokens are kept
   as given (the model's dtype) in the `exact` store and attention is plain
   softmax attention on them: a short chat is answered as with mlx-lm's fp cache.
   The queries of the first `quant_start` positions are summarised (`QueryStats`)
   for the key codec's query weights.
2. Calibration, at the first attention call that finds `quant_start` tokens held
   (the first call when quant_start is 0): the codecs are built from exactly the
   first `quant_start` tokens and their queries (so the codes of a prefix never
   depend on what follows it: a server's prefix cache is exact), and every exact
   token moves out: the first `fp_sink` into the fp16 `sink` store, the newest
   `fp_window` into the fp16 `window` store, the rest into `codes`.
3. Compressed phase.  A new token goes into the window (whose oldest token is
   encoded into codes), or straight into codes when there is no window.  A codec
   with a slow encoder (trellis codes: `encode_block` > 1) has its tokens staged in
   the window, in fp16, until `encode_block` of them can be encoded together.
4. What `update_and_fetch` hands back.  At first, the whole cache as arrays (the exact
   tokens, or their codes decoded: lazily, so nothing is computed unless the model reads
   them), so a model that attends by itself (hand-written softmax, MLA's rope scores, KV
   reused by later layers) is served correctly.  Once a layer's attention call comes
   through tq_mlx with those very arrays as keys and values, attention reads the cache's
   blocks directly and later updates hand back only the new tokens as placeholders.
   Attention called with other arrays (the model transformed them) runs mlx-lm's own
   attention on what it was given.  A layer that calls attention with cache=None on arrays
   this cache handed out (KV-shared layers) is routed back to this cache.
Inputs are validated at once on prefill; a decode step adds no host sync, so its
NaN/inf check is deferred: non-finite input leaves non-finite norms or values,
which the next prefill or save finds (`check_finite`) and reports.
With `max_size` the cache is a sliding window with mlx-lm's RotatingKVCache
semantics (`keep` first tokens kept); its codes and window are rings, written in place.
With `chunk_size` it is a chunked-attention cache as mlx-lm's ChunkedKVCache (llama4):
the model calls `maybe_trim_front()` before each update, which forgets all but the
newest `chunk_size` tokens (`start_position` counts the forgotten ones).
"""

import json
from typing import NamedTuple

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from . import kernels
from .cache_state import STATE_VERSION, prefixed, restore
from .calibration import QueryStats
from .codec import check_input, nonfinite_message
from .codec_factory import Calibration, build_codec, check_dims, needs_queries
from .config import CacheConfig, resolve_config
from .fp16_codec import FP16, FP_KEY
from .handouts import HandsOut
from .rope_mean import RingSlots, RopeMap, at, tables
from .sharding import Shard
from .store import TokenStore


class Block(NamedTuple):
    """A run of tokens in one format: k, v are encodings (dicts of (B, H, n, ...) arrays) read by the codecs;
    fp blocks (exact tokens, fp16 sinks and window) hold {"x": (B, H, n, d)} in the original domain."""

    k_codec: object
    v_codec: object
    k: dict
    v: dict
    is_fp: bool
    length: int


class CodeBuffers(NamedTuple):
    """The codes store's full-capacity buffers (kernels read the first `length` slots, no copy)."""

    length: int
    k: dict
    v: dict


def _fp_block(store: TokenStore, ordered: bool = False) -> Block:
    view = store.ordered() if ordered else store.view()
    return Block(FP16, FP16, {FP_KEY: view["k"]}, {FP_KEY: view["v"]}, True, store.length)


def check_pair(keys, values):
    """keys, values: (B, H, L, d) arrays of one dtype with equal B, H, L."""
    if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
        raise ValueError(
            f"keys and values must be (B, H, L, d) with equal B, H, L; got {keys.shape} and {values.shape}"
        )
    if keys.dtype != values.dtype:
        raise TypeError(f"keys ({keys.dtype}) and values ({values.dtype}) must share a dtype")


def check_model(layer: int, expect: tuple, keys, values):
    """Refuse keys/values (B, H, L, d) of another model: expect (H, dk, dv) of this layer, None where unknown."""
    want_h, want_dk, want_dv = expect
    h, dk, dv = keys.shape[1], keys.shape[3], values.shape[3]
    if (want_h is not None and h != want_h) or (want_dk is not None and (dk, dv) != (want_dk, want_dv)):
        raise ValueError(
            f"layer {layer} of this model has {want_h} KV heads of sizes (dk, dv) = ({want_dk}, "
            f"{want_dv}); got keys {keys.shape}, values {values.shape}: a cache made for another model?"
        )


class TurboQuantKVCache(HandsOut, _BaseCache):
    """KV cache for one attention layer; keys/values arrive as (B, H, L, d) arrays.

    max_size, keep: a sliding window (mlx-lm's RotatingKVCache); chunk_size: chunked attention (ChunkedKVCache).
    kv_heads, head_dims: what the model's layer produces ((dk, dv)), when known: other shapes are refused.
    shard: the tensor-parallel rank's Shard (sharding.py): per-head constants use global head indices.
    rope: the layer's RopeMap (rope_mean.probe), for RoPE-aware key centring (a config's center="rope").
    """

    def __init__(
        self,
        config=None,
        layer: int = 0,
        max_size=None,
        keep: int = 0,
        kv_heads=None,
        head_dims=None,
        chunk_size=None,
        shard: Shard = None,
        rope: RopeMap = None,
    ):
        if max_size is not None and chunk_size is not None:
            raise ValueError("a TurboQuantKVCache is a sliding window (max_size) or chunked (chunk_size), not both")
        self.config: CacheConfig = resolve_config(config)
        self.layer = layer
        self.max_size = max_size
        self.keep = keep
        self.chunk_size = chunk_size
        self.shard = Shard(*(shard or ()))
        self.start_position = 0
        self.expect = (kv_heads, *(head_dims or (None, None)))
        self.rope = rope
        if rope is not None:
            tables(rope)  # the map's tables, made once per model (shared by its layers)
        self.offset = 0
        self._clear()

    def _clear(self):
        self.shape = None  # (B, H, dk, dv)
        self.k_codec = self.v_codec = None
        self.calibration_length = 0  # tokens the codecs were calibrated on (0: exact phase)
        self.encoded = 0  # tokens that went into codes (a ring's included), less trimmed ones
        self.qstats = None  # QueryStats of the calibration positions, while the key codec needs them
        self.exact = TokenStore()  # "k", "v" as given, before calibration
        self.sink = TokenStore(step=1)  # "k", "v" float16 first tokens (attention sinks), exact size
        R = self.window_size
        ring = None if self.max_size is None else (self.max_size - R, self.keep)
        self.codes = TokenStore(ring=ring)  # "k_*" and "v_*" encodings
        self.window = TokenStore(ring=(R, 0) if R else None)  # the newest R tokens, fp16
        self.pending = False  # set by update, cleared by any attention call on this cache
        self._reset_handouts()
        self.dtype = None  # the model's K/V dtype

    @property
    def window_size(self) -> int:
        """fp_window, at most what a sliding window leaves beside its `keep` tokens and one code slot."""
        R = self.config.fp_window
        return R if self.max_size is None else min(R, max(0, self.max_size - self.keep - 1))

    @property
    def n_kv_heads(self) -> int:
        return self.shape[1]

    @property
    def calibrated(self) -> bool:
        return self.calibration_length > 0

    def _stores(self):
        return (self.exact, self.sink, self.codes, self.window)

    def held(self) -> int:
        """Tokens stored now (a sliding layer holds up to max_size + L - 1 right after an L-token update,
        as mlx-lm's RotatingKVCache does; size() reports at most max_size)."""
        return sum(s.length for s in self._stores())

    # ---- input checks ----------------------------------------------------
    def _check(self, keys, values):
        check_pair(keys, values)
        check_model(self.layer, self.expect, keys, values)
        b, h, n, dk = keys.shape
        got = (b, h, dk, values.shape[-1])
        if self.shape is None:
            check_dims(self.config, dk, f"layer {self.layer}")
            check_dims(self.config, got[3], f"layer {self.layer}")
        if self.shape is not None and got != self.shape:
            raise ValueError(
                f"this cache holds (B, H, dk, dv) = {self.shape}; got keys {keys.shape}, "
                f"values {values.shape}: a cache made for another model?"
            )
        check_input(keys, dk, "keys", finite=False)
        check_input(values, values.shape[-1], "values", finite=False)
        if n > 1:  # prefill: one host sync for the new chunk and what earlier decode steps stored
            new_ok = mx.isfinite(keys).all() & mx.isfinite(values).all()
            if not (new_ok & self._stored_finite()).item():
                self.check_finite()
                bad = int((~mx.isfinite(keys)).sum().item()), int((~mx.isfinite(values)).sum().item())
                raise ValueError(nonfinite_message("keys" if bad[0] else "values", bad[0] or bad[1]))

    def _stored_finite(self) -> mx.array:
        ok = mx.array(True)
        for st in self._stores():
            for a in st.view().values():
                if mx.issubdtype(a.dtype, mx.floating):
                    ok = ok & mx.isfinite(a).all()
        return ok

    def check_finite(self):
        """Raise if an earlier decode step stored NaN or inf (decode steps do not check at once: no host sync)."""
        if not self._stored_finite().item():
            raise ValueError(
                f"layer {self.layer}: keys or values of an earlier decode step were NaN or inf, and the cache now "
                "holds them; the model produced non-finite activations. Trim the cache back past them or reset it."
            )

    def check_queries(self, queries):
        """Refuse queries that do not fit this cache: (B, Hq, L, dk) with Hq a multiple of H."""
        b, hq, _, dk = queries.shape
        want_b, h, want_dk, _ = self.shape
        if hq % h or dk != want_dk or b != want_b:
            raise ValueError(
                f"queries {tuple(queries.shape)} do not fit this cache (batch {want_b}, {h} KV "
                f"heads of size {want_dk}): a cache made for another model?"
            )

    # ---- storing -------------------------------------------------------------
    def update_and_fetch(self, keys, values):
        """Store new (B, H, L, d) keys/values; returns the whole cache as arrays, or, once attention has shown
        that it reads the cache's blocks, the new keys/values as placeholders (see the module docstring)."""
        if self.pending and not self.hands_out_all:
            raise RuntimeError(
                f"layer {self.layer}: the model attended without tq_mlx's attention after it had attended through "
                "it (it read placeholders): this model mixes attention paths, which TurboQuant caches do not "
                "support; use mlx-lm's own cache for it"
            )
        self._check(keys, values)
        self._append(keys, values)
        return self._hand_out(keys, values)

    def _append(self, keys, values):
        """Store checked (B, H, L, d) keys/values (update_and_fetch without the checks and what it returns)."""
        if self.pending and not self.calibrated:  # a layer that attends by itself: calibrate on its own schedule
            self.prepare_attention(None, 0)
        b, h, n, dk = keys.shape
        if self.shape is None:
            self.shape = (b, h, dk, values.shape[-1])
        if self.max_size is not None and not self._rings_full(n):
            # mlx-lm's rotating semantics: a new token or chunk sees the max_size - 1 newest older tokens
            self._drop_front(self.held() + 1 - self.max_size)
        self.offset += n
        self.dtype = keys.dtype
        if not self.calibrated:
            self.exact.append({"k": keys, "v": values})
        else:
            self._store({"k": keys, "v": values})
        self.pending = True

    def all_arrays(self):
        """The whole cache as (keys, values) (B, H, T, d) in the model's dtype and temporal order: the exact
        tokens as stored, or the codes decoded (lazy: computed only if read)."""
        blocks = self.blocks(ordered=True)
        if not blocks:
            raise ValueError("an empty TurboQuantKVCache has no keys or values")
        ks = [b.k_codec.decode(b.k).astype(self.dtype) for b in blocks]
        vs = [b.v_codec.decode(b.v).astype(self.dtype) for b in blocks]
        return (
            ks[0] if len(ks) == 1 else mx.concatenate(ks, axis=2),
            vs[0] if len(vs) == 1 else mx.concatenate(vs, axis=2),
        )

    def _encode(self, tokens: dict) -> dict:
        start = self.next_position  # the first token's position (RoPE-centred keys)
        self.encoded += tokens["k"].shape[2]
        kc = at(self.k_codec, start)
        enc = {f"k_{n}": a for n, a in kc.encode(tokens["k"]).items()}
        enc.update({f"v_{n}": a for n, a in self.v_codec.encode(tokens["v"]).items()})
        return enc

    def _store(self, tokens: dict):
        """Calibrated: tokens {"k", "v"} (B, H, n, d), oldest first, into sinks, window and codes."""
        room = self.config.fp_sink - self.sink.length if self._keeps_front else 0
        if room > 0:
            self.sink.append({k: v[:, :, :room].astype(mx.float16) for k, v in tokens.items()})
            tokens = {k: v[:, :, room:] for k, v in tokens.items()}
        n = tokens["k"].shape[2]
        if n == 0:
            return
        R, win, E = self.window_size, self.window, self._block
        half = {k: v.astype(mx.float16) for k, v in tokens.items()}
        if E > 1:  # staged: encoded E or more at a time, the newest R kept
            win.append(half)
            if win.length >= R + E:
                self.codes.append(self._encode(win.take_front(win.length - R)))
            return
        if R == 0:
            self.codes.append(self._encode(tokens))
        elif n == 1 and win.length == R:  # a decode step: the oldest window token goes to codes
            self.codes.append(self._encode(win.oldest()))
            win.append(half)
        else:
            win.append(half)
            if win.length > R:
                self.codes.append(self._encode(win.take_front(win.length - R)))

    def _rings_full(self, n: int) -> bool:
        """A decode step on a full sliding cache: the rings overwrite their oldest tokens in place."""
        return (
            n == 1
            and self.calibrated
            and self._block == 1
            and self.codes.length == self.codes.ring[0]
            and self.window.length == self.window_size
            and self.exact.length == 0
        )

    @property
    def _block(self) -> int:
        """Tokens the codecs encode together (1 before calibration)."""
        return max((c.encode_block for c in (self.k_codec, self.v_codec) if c is not None), default=1)

    def _configure_window(self):
        """Once the codecs are known: a codec that encodes in blocks stages tokens in a window that grows
        to window_size + block - 1 tokens (not a ring); its contents are kept."""
        E = self._block
        if E > 1 and (self.window.ring is not None or self.window.step != E):
            staged = TokenStore(step=E)
            staged.load(self.window.ordered())
            self.window = staged

    @property
    def _positional(self) -> bool:
        """Whether the key codes depend on positions (RoPE-centred keys: `encoded` places the next ones)."""
        return getattr(self.k_codec, "rope_map", None) is not None

    @property
    def _keeps_front(self) -> bool:
        """Whether the first tokens stay for good (full attention: they can go to the fp16 sink store)."""
        return self.max_size is None and self.chunk_size is None

    def maybe_trim_front(self):
        """Chunked attention (mlx-lm's ChunkedKVCache): forget all but the newest chunk_size tokens."""
        drop = self.held() - self.chunk_size
        if drop > 0:
            self._drop_front(drop)
            self.start_position += drop

    def _drop_front(self, n: int):
        """Sliding window: forget the n oldest tokens after the first `keep`."""
        if n <= 0:
            return
        skip = self.keep
        for st in self._stores():
            if n <= 0:
                break
            if st.length <= skip:
                skip -= st.length
                continue
            d = min(n, st.length - skip)
            st.remove(skip, d)
            n, skip = n - d, 0

    # ---- calibration -----------------------------------------------------------
    @property
    def _quant_start(self) -> int:
        """quant_start, at most what a sliding window can hold."""
        q = self.config.quant_start
        bound = self.max_size or self.chunk_size
        return q if bound is None else min(q, bound)

    def prepare_attention(self, queries, L: int):
        """Called by attention with this call's grouped, scaled queries (B, H, G*L, dk) for L new tokens:
        clears `pending`, records the calibration queries (once per update: a second attention call on the
        same tokens, e.g. a KV-shared layer's, adds none), and calibrates once quant_start tokens are held."""
        fresh, self.pending = self.pending, False
        if self.calibrated:
            return
        Q = self._quant_start
        if fresh and queries is not None and needs_queries(self.config.keys, "k"):
            if self.qstats is None:
                self.qstats = QueryStats(self.shape[1], self.shape[2], self.config.keys.query_weighting == "full")
            first = self.offset - L  # position of this call's first query
            take = L if Q == 0 else max(0, min(L, Q - first))
            if take:
                self.qstats.add(queries.reshape(*queries.shape[:2], -1, L, queries.shape[3])[:, :, :, :take], first)
        if self.held() >= max(Q, 1):
            self._calibrate(self.held() if Q == 0 else Q)

    def _calibrate(self, n: int):
        """Build the codecs from the first n exact tokens (and their queries) and store every exact token."""
        tokens = self.exact.ordered()
        cfg, (_, h, dk, dv) = self.config, self.shape
        use = kernels.enabled()
        keys = tokens["k"][:, :, :n].astype(mx.float32)
        values = tokens["v"][:, :, :n].astype(mx.float32)
        queries = self.qstats if self.qstats is not None and self.qstats.n else None  # none seen: no weights
        off = self.shard.head_offset
        rope = self.rope if self.chunk_size is None else None  # chunked layers: static centring
        self.k_codec = build_codec(
            cfg.keys, cfg, dk, h, self.layer, "k", Calibration(keys, queries, rope=rope), use, head_offset=off
        )
        self.v_codec = build_codec(cfg.values, cfg, dv, h, self.layer, "v", Calibration(values), use, head_offset=off)
        mx.eval([c.constants() for c in (self.k_codec, self.v_codec)])  # ready, and usable from any thread
        self.calibration_length, self.qstats = n, None
        self.exact.clear()  # in place: a batch row's store is a row of the batch's
        self._configure_window()
        self._store(tokens)

    # ---- what attention reads -------------------------------------------------
    def blocks(self, values_from_keys: bool = False, ordered: bool = False):
        """The tokens as Blocks in temporal order: exact tokens (before calibration), or fp16 sinks, codes, window.

        A wrapped ring's slots are not in temporal order unless `ordered` (a copy; or `linearize()` first).
        values_from_keys: the keys serve as values too (MLA's latent attention)."""
        if not self.calibrated:
            out = [_fp_block(self.exact, ordered)] if self.exact.length else []
        else:
            out = [_fp_block(self.sink, ordered)] if self.sink.length else []
            if self.codes.length:
                view = self.codes.ordered() if ordered else self.codes.view()
                fp = self.k_codec is FP16 and self.v_codec is FP16
                k, v = prefixed(view, "k_"), prefixed(view, "v_")
                kc = at(self.k_codec, self.sink.length, self.ring_slots(ordered), self.code_span())  # positions
                out.append(Block(kc, self.v_codec, k, v, fp, self.codes.length))
            if self.window.length:
                out.append(_fp_block(self.window, ordered))
        if values_from_keys:
            out = [b._replace(v_codec=b.k_codec, v=b.k, is_fp=b.is_fp or b.k_codec is FP16) for b in out]
        return out

    @property
    def next_position(self) -> int:
        """The position the next coded token takes (RoPE-centred keys): after the sinks and the tokens encoded."""
        return self.sink.length + self.encoded

    def code_span(self):
        """(first, last, front): the codes hold positions first .. last (the sinks' count on), or a ring's
        `keep` first ones."""
        last = self.next_position - 1
        return max(last + 1 - self.codes.length, 0), last, 0 if self._keeps_front else self.keep

    def ring_slots(self, ordered: bool = False):
        """RoPE-centred keys in a ring (a sliding layer): where its code slots sit in position (RingSlots; ordered:
        laid out as `codes.ordered()`); else None."""
        if not self._positional or self.max_size is None:
            return None
        return RingSlots.of([(self.codes, self.next_position)], ordered)

    def linearize(self):
        """Put ring slots in temporal order (for a positional mask at decode)."""
        for st in self._stores():
            st.linearize()

    def code_buffers(self) -> CodeBuffers:
        """The codes store's full-capacity buffers (no slicing: the kernels read the first `length`)."""
        bufs = self.codes.buffers
        return CodeBuffers(self.codes.length, prefixed(bufs, "k_"), prefixed(bufs, "v_"))

    def fp16_buffers(self):
        """(sink, window): CodeBuffers of the fp16 stores' full buffers ({"x": (B, H, capacity, d)}), or None
        for an empty store (the kernels read the first `length` slots)."""
        out = []
        for st in (self.sink, self.window):
            b = st.buffers
            out.append(CodeBuffers(st.length, {FP_KEY: b["k"]}, {FP_KEY: b["v"]}) if st.length else None)
        return tuple(out)

    # ---- mlx-lm protocol ----------------------------------------------------------
    batch_class = None  # BatchTurboQuantKVCache, set by batch_cache.py (which builds on this module)

    @classmethod
    def merge(cls, caches):
        """mlx-lm's batching: these caches (one layer, one config) as one BatchTurboQuantKVCache."""
        return cls.batch_class(caches)

    def size(self) -> int:
        """Tokens in context, as mlx-lm counts them (a sliding window reports at most max_size)."""
        return self.held() if self.max_size is None else min(self.offset, self.max_size)

    def empty(self) -> bool:
        return self.held() == 0

    def is_trimmable(self) -> bool:
        return self.max_size is None or self.offset < self.max_size

    def trim(self, n: int) -> int:
        """Forget the newest n tokens (and, before calibration, their queries).  Trimming below
        `calibration_length` keeps the codecs (and the codes of the tokens left): the cache then differs
        from one that never saw the trimmed tokens."""
        n = min(self.offset, n, self.held())
        left = n
        for st in (self.window, self.codes, self.sink, self.exact):
            d = min(left, st.length)
            st.trim_back(d)
            left -= d
            self.encoded -= d if st is self.codes else 0
        self.offset -= n
        self.pending = False
        if self.qstats is not None:  # the trimmed tokens' queries go too: calibration as if never seen
            self.qstats.truncate(self.offset)
        return n

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return self.mask_for(N, self.held(), return_array, window_size)

    def mask_for(self, N: int, held: int, return_array: bool = False, window_size=None):
        """make_mask for N new tokens when the cache holds `held` tokens (what a batch row asks for)."""
        if self.max_size is None:
            return create_attention_mask(N, held, return_array, window_size)
        if N > 1:
            window_size = window_size or self.max_size
            offset = min(self.max_size - 1, held)
            if offset + N > window_size or return_array:
                return create_causal_mask(N, offset, window_size=window_size)
            return "causal"
        if window_size is None or window_size >= self.max_size:
            return None
        t = min(held + 1, self.max_size)
        return mx.arange(t) >= t - window_size

    @property
    def nbytes(self) -> int:
        """Bytes really held: every store with its capacity, and the codecs' per-head constants
        (rotation signs or matrices, learnt means, weights, channel orders)."""
        side = sum(c.side_nbytes for c in (self.k_codec, self.v_codec) if c is not None)
        return sum(st.nbytes for st in self._stores()) + side

    def shared_constants(self) -> list:
        """Constants this layer holds in common with others (a model's RoPE map and its tables), counted once per
        prompt cache by `describe.cache_nbytes`, not in `nbytes`."""
        out = [] if self.rope is None else [*self.rope, *tables(self.rope).arrays()]  # held from the start
        return out + [a for c in (self.k_codec, self.v_codec) for a in getattr(c, "shared_constants", list)()]

    @property
    def state(self):
        self.check_finite()
        meta = {
            "version": STATE_VERSION,
            "config": json.loads(self.config.to_json()),
            "layer": self.layer,
            "offset": self.offset,
            "max_size": self.max_size,
            "keep": self.keep,
            "chunk_size": self.chunk_size,
            "start_position": self.start_position,
            "shard": list(self.shard),
            "shape": self.shape,
            "expect": self.expect,
            "calibration_length": self.calibration_length,
            **({"encoded": self.encoded} if self._positional else {}),  # where RoPE-centred codes go on
            **{f"n_{name}": st.length for name, st in self._named_stores()},
        }
        st = {"tq_meta": json.dumps(meta)}
        for name, store in self._named_stores():
            st.update({f"{name}_{k}": v for k, v in store.ordered().items()})
        for p, c in (("k", self.k_codec), ("v", self.v_codec)):
            if c is not None:
                st.update({f"calib_{p}_{n}": a for n, a in c.calibration_state().items()})
        if self.qstats is not None:
            st.update({f"qstats_{n}": a for n, a in self.qstats.state().items()})
        if self.rope is not None:
            st.update({f"rope_{n}": a for n, a in self.rope.state().items()})
        return st

    def _named_stores(self):
        return (("exact", self.exact), ("sink", self.sink), ("codes", self.codes), ("window", self.window))

    @state.setter
    def state(self, st):
        restore(self, st)

    def _rebuild_codecs(self, calib: dict):
        """Codecs from a saved calibration state (a reloaded cache)."""
        cfg, (_, h, dk, dv) = self.config, self.shape
        use, off = kernels.enabled(), self.shard.head_offset
        k, v = Calibration(state=prefixed(calib, "k_")), Calibration(state=prefixed(calib, "v_"))
        self.k_codec = build_codec(cfg.keys, cfg, dk, h, self.layer, "k", k, use, head_offset=off)
        self.v_codec = build_codec(cfg.values, cfg, dv, h, self.layer, "v", v, use, head_offset=off)

    def __deepcopy__(self, memo):
        new = TurboQuantKVCache.__new__(TurboQuantKVCache)
        new.__dict__.update(self.__dict__)
        new.exact, new.sink, new.codes, new.window = (st.copy() for st in self._stores())
        new.qstats = None if self.qstats is None else self.qstats.copy()
        return new
