"""BatchTurboQuantKVCache: several sequences in one compressed cache, with mlx-lm's batch protocol.

mlx-lm batches requests (`BatchGenerator`, `batch_generate`, `mlx_lm.server`) when every cache can
`merge`; `TurboQuantKVCache.merge(caches)` gives this class, which `extract`s each sequence back as
the TurboQuantKVCache it would be alone, `filter`s finished sequences out, `extend`s with new ones,
and takes mlx-lm's right-padded prompts (`prepare(lengths=..., right_padding=...)`, `finalize()`).

Each sequence is a `BatchRow`: the single cache's logic on its row of shared `RaggedStore`s, with its
own codecs, calibrated on its own first `quant_start` tokens, so a sequence is stored exactly as it
would be alone (padding is never stored, so never calibrated on).  Rows are left-aligned in every
store, each with its own length; no left padding is held.
- Prefill (L > 1) is stored and attended one row at a time, on the single cache's own code
  (`batch_attention`): the same chunks and calibration moments as a single run.
- A decode step (one token per row) is stored for all rows at once (`batch_step`) and attended for
  all rows at once: one codec for the batch (`batch_codecs`: each row's calibration stacked), and
  the kernels or the reference path take each row's token counts.
`offset` is an array of each row's position, as mlx-lm's batch caches (RoPE takes it).
"""

import logging
from collections import OrderedDict

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import _BaseCache

from . import kernels
from .batch_codecs import stacked
from .batch_row import STORES, BatchRow, copy_rows
from .cache import TurboQuantKVCache, check_model, check_pair
from .codec import check_input, nonfinite_message
from .codec_factory import check_dims
from .ragged_store import RaggedStore

log = logging.getLogger("tq_mlx")
_MASKS = OrderedDict()  # id(mask) -> (mask, window_size, return_array): masks batch caches made
_LOGGED_BATCH = [0]


def refusal(cache):
    """Why a TurboQuantKVCache cannot be merged into a batch (a sentence naming what batches), or None."""
    if cache.chunk_size is not None:
        return "chunked-attention TurboQuant caches (llama4) do not batch yet"
    if "trellis" in (cache.config.keys.grid, cache.config.values.grid):
        return (
            f"{cache.config.name!r}: trellis-coded caches (-tcq, staged encodes) do not batch yet; "
            "batch with a Lloyd-Max, uniform (-fast), HQMQ or fp16 preset (e.g. 'k4v4', 'k4v4-fast')"
        )
    return None


def _settings(c):
    return (c.config, c.layer, c.max_size, c.keep, c.chunk_size, c.expect, c.shard)


class BatchTurboQuantKVCache(_BaseCache):
    """A batch of TurboQuant caches of one layer; keys/values arrive as (B, H, L, d) arrays."""

    def __init__(self, caches):
        """The sequences of `caches` (TurboQuantKVCaches of one layer with one config) as one batch."""
        if not caches:
            raise ValueError("a batch cache needs at least one sequence")
        first = caches[0]
        for c in caches:
            if type(c) is not TurboQuantKVCache:
                raise TypeError(f"only TurboQuantKVCaches merge into a batch, got {type(c).__name__}")
            if _settings(c) != _settings(first):
                raise ValueError(
                    "caches merged into a batch must share config, layer, window and tensor-parallel shard: got "
                    f"{first.config.name!r} layer {first.layer} window {first.max_size} and {c.config.name!r} "
                    f"layer {c.layer} window {c.max_size}"
                )
        reason = refusal(first)
        if reason is not None:
            raise NotImplementedError(reason)
        shapes = {c.shape[1:] for c in caches if c.shape is not None}
        dtypes = {c.dtype for c in caches if c.dtype is not None}
        if len(shapes) > 1 or len(dtypes) > 1:
            raise ValueError(f"caches merged into a batch hold other shapes or dtypes: {shapes}, {dtypes}")
        self.config, self.layer, self.max_size, self.keep, self.chunk_size, self.expect, self.shard = _settings(first)
        self.shape = next(iter(shapes), None)  # (H, dk, dv)
        self.stores = {n: RaggedStore.from_stores([getattr(c, n) for c in caches]) for n in STORES}
        self.rows = [BatchRow.adopt(c, i, self.stores) for i, c in enumerate(caches)]
        self._reset_transient()

    def _reset_transient(self):
        self._remaining = None  # right padding: each row's real tokens still to come (prepare)
        self._skip = None  # left padding: each row's padding tokens still to come
        self.chunk = None  # [(start, count, held before)] per row of the last prefill update
        self.handed = (None, None)
        self._offset = None
        self._codecs = (None, None)

    # ---- mlx-lm's batch protocol ----------------------------------------------------------------
    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def offset(self) -> mx.array:
        """Each row's position (tokens seen), int32 (B,): RoPE offsets, as mlx-lm's batch caches."""
        if self._offset is None:
            self._offset = mx.array([r.offset for r in self.rows], mx.int32)
        return self._offset

    @property
    def n_kv_heads(self) -> int:
        return self.shape[0]

    def extract(self, idx: int):
        """Sequence idx as a TurboQuantKVCache of its own, as it would be had it run alone."""
        return self.rows[idx].to_single()

    def filter(self, batch_indices):
        """Keep only the given sequences, in that order."""
        keep = batch_indices.tolist() if isinstance(batch_indices, mx.array) else [int(i) for i in batch_indices]
        for st in self.stores.values():
            st.take(keep)
        self.rows = [self.rows[i] for i in keep]
        for i, r in enumerate(self.rows):
            r.index = i
        for name in ("_remaining", "_skip"):
            if getattr(self, name) is not None:
                setattr(self, name, [getattr(self, name)[i] for i in keep])
        self._offset, self._codecs, self.chunk = None, (None, None), None

    def extend(self, other: "BatchTurboQuantKVCache"):
        """Append other's sequences (other is consumed)."""
        if not isinstance(other, BatchTurboQuantKVCache) or _settings(other) != _settings(self):
            raise ValueError("only a batch cache of the same config, layer and window extends this one")
        if None not in (self.shape, other.shape) and self.shape != other.shape:
            raise ValueError(f"batch caches of other shapes: {self.shape} and {other.shape}")
        self.shape = self.shape or other.shape
        n = self.batch
        for name, st in self.stores.items():
            st.extend(other.stores[name])
        for i, r in enumerate(other.rows):
            r.index = n + i
            r.bind(self.stores)
        self.rows = self.rows + other.rows
        for name in ("_remaining", "_skip"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None or theirs is not None:
                setattr(self, name, (mine or [0] * n) + (theirs or [0] * other.batch))
        self._offset, self._codecs, self.chunk = None, (None, None), None

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        """The next update's tokens are padded: on the left (an empty batch; left_padding per row) or on the
        right (lengths: each row's real tokens over the next updates, right_padding > 0 somewhere)."""
        if left_padding is not None:
            if not self.empty():
                raise ValueError("left padding can only be added to an empty batch cache")
            self._skip = [int(p) for p in left_padding]
        if right_padding is not None and max(right_padding) > 0:
            self._remaining = [int(n) for n in lengths]

    def finalize(self):
        self._remaining = None

    def _real_tokens(self, L: int):
        """(start, count) of each row's real tokens among the L positions of an update (padding skipped)."""
        out = []
        for b in range(self.batch):
            start = 0
            if self._skip is not None:
                start = min(self._skip[b], L)
                self._skip[b] -= start
            n = L - start
            if self._remaining is not None:
                n = min(n, self._remaining[b])
                self._remaining[b] -= n
            out.append((start, n))
        return out

    # ---- storing ------------------------------------------------------------------------------------
    def update_and_fetch(self, keys, values):
        """Store (B, H, L, d) keys/values (padding positions skipped); returns them as placeholders:
        attention (`batch_attention`) reads the stores."""
        from .batch_step import store_step

        self._check(keys, values)
        L = keys.shape[2]
        real = self._real_tokens(L)
        if self.shape is None:
            self.shape = (keys.shape[1], keys.shape[3], values.shape[3])
        if L == 1 and all(n == 1 for _, n in real):
            self.chunk = None
            store_step(self, keys, values)
            if self.batch != _LOGGED_BATCH[0]:
                _LOGGED_BATCH[0] = self.batch
                log.info("tq_mlx: %d sequence(s) decode together on TurboQuant caches", self.batch)
        else:
            self.chunk = []
            for r, (s, n) in zip(self.rows, real):
                self.chunk.append((s, n, r.held()))
                if n:
                    b = r.index
                    r._append(keys[b : b + 1, :, s : s + n], values[b : b + 1, :, s : s + n])
        self._offset = None
        self.handed = (keys, values)
        return keys, values

    def _check(self, keys, values):
        check_pair(keys, values)
        b, h, n, dk = keys.shape
        if b != self.batch:
            raise ValueError(f"keys for {b} sequences, but this batch cache holds {self.batch}")
        check_model(self.layer, self.expect, keys, values)
        got = (h, dk, values.shape[-1])
        if self.shape is None:
            for d in got[1:]:
                check_dims(self.config, d, f"layer {self.layer}")
        elif got != self.shape:
            raise ValueError(f"this batch cache holds (H, dk, dv) = {self.shape}; got keys {keys.shape}")
        dtypes = {r.dtype for r in self.rows if r.dtype is not None}
        if dtypes and keys.dtype not in dtypes:
            raise TypeError(f"this batch cache holds {dtypes.pop()} tokens; got {keys.dtype}")
        check_input(keys, dk, "keys", finite=False)
        check_input(values, values.shape[-1], "values", finite=False)
        if n > 1:  # prefill: one host sync for the new chunk and what earlier decode steps stored
            ok = mx.isfinite(keys).all() & mx.isfinite(values).all()
            for st in self.stores.values():
                for a in st.buffers.values():
                    if mx.issubdtype(a.dtype, mx.floating):
                        held = mx.arange(a.shape[2]) < mx.array(st.lengths)[:, None]
                        held = held.reshape(a.shape[0], 1, a.shape[2], *(1,) * (a.ndim - 3))
                        ok = ok & (mx.isfinite(a) | ~held).all()
            if not ok.item():
                raise ValueError(nonfinite_message("keys or values (now or from an earlier decode step)"))

    # ---- what attention reads -------------------------------------------------------------------
    def codecs(self):
        """(K codec, V codec) coding row b with row b's own codecs (rebuilt when a row calibrates)."""
        key = tuple((id(r.k_codec), id(r.v_codec)) for r in self.rows)
        if self._codecs[0] != key:
            H, dk, dv = self.shape
            use = kernels.enabled()
            cfg = self.config
            off = self.shard.head_offset
            ck = stacked([r.k_codec for r in self.rows], cfg.keys, cfg, dk, H, self.layer, "k", use, off)
            cv = stacked([r.v_codec for r in self.rows], cfg.values, cfg, dv, H, self.layer, "v", use, off)
            self._codecs = (key, (ck, cv))
        return self._codecs[1]

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """mlx-lm's batch mask (B, 1, N, T) over left-padded rows; batch attention recognises it and masks
        each row from its own counts instead (our rows are not padded)."""
        held = [r.held() for r in self.rows]
        if self.max_size is not None:
            held = [min(h, self.max_size - 1) for h in held]
        T = max(held, default=0)
        window = window_size or self.max_size
        pad = mx.array([T - h for h in held], mx.int32)
        mask = create_causal_mask(N, T, window_size=window, left_padding=pad)
        _MASKS[id(mask)] = (mask, window_size, return_array)
        while len(_MASKS) > 16:
            _MASKS.popitem(last=False)
        return mask

    # ---- mlx-lm's cache interface -------------------------------------------------------------------
    @property
    def state(self):
        """Every stored array (for mx.eval); a batch cache is not saved: extract(i) gives what saves."""
        return [a for st in self.stores.values() for a in st.buffers.values()]

    @state.setter
    def state(self, v):
        raise NotImplementedError("a batch cache is not loaded from a file: load single caches and merge them")

    @property
    def keys(self):
        return self.handed[0]

    @property
    def values(self):
        return self.handed[1]

    def size(self) -> int:
        return max((r.size() for r in self.rows), default=0)

    def empty(self) -> bool:
        return all(r.empty() for r in self.rows)

    def is_trimmable(self) -> bool:
        return all(r.is_trimmable() for r in self.rows)

    def trim(self, n: int) -> int:
        """Forget each row's newest n tokens (TurboQuantKVCache.trim per row)."""
        trimmed = [r.trim(n) for r in self.rows]
        self._offset = None
        return min(trimmed, default=0)

    @property
    def nbytes(self) -> int:
        """Bytes held: every store with its capacity, each row's codec constants and the batch's stacked ones."""
        codecs = [c for r in self.rows for c in (r.k_codec, r.v_codec)]
        codecs += list(self._codecs[1] or ())
        return sum(st.nbytes for st in self.stores.values()) + sum(c.side_nbytes for c in codecs if c is not None)

    def shared_constants(self) -> list:
        """As TurboQuantKVCache.shared_constants, over the rows and the stacked codecs."""
        codecs = list(self._codecs[1] or ())
        return [a for r in self.rows for a in r.shared_constants()] + [
            a for c in codecs for a in getattr(c, "shared_constants", list)()
        ]

    def __deepcopy__(self, memo):
        new = BatchTurboQuantKVCache.__new__(BatchTurboQuantKVCache)
        new.__dict__.update(self.__dict__)
        new.stores = {n: st.copy() for n, st in self.stores.items()}
        new.rows = copy_rows(self.rows, new.stores)
        for name in ("_remaining", "_skip"):
            if getattr(self, name) is not None:
                setattr(new, name, list(getattr(self, name)))
        return new


TurboQuantKVCache.batch_class = BatchTurboQuantKVCache  # what TurboQuantKVCache.merge builds
