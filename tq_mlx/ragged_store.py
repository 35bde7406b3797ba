"""A token store for a batch: arrays (B, H, capacity, ...) where each batch row has its own length.

`RaggedStore` is `store.TokenStore` with one length (and, for a ring, one start) per batch row: row b
holds its tokens in slots [0, lengths[b]) in the order TokenStore would (a wrapped ring's oldest
rotating token at slot keep + starts[b]).  Rows share the buffers and their capacity, the longest
row's length plus one spare slot: a batched write (`write`) sends the rows that do not write this
step to their first free slot, which no reader looks at.

- `row(b)` is a `RowStore`: TokenStore's interface on row b, so a TurboQuantKVCache runs its own
  logic (appends, calibration, sliding-window rings) on one row of a batch: prefill, one row at a time;
- `gather`, `write` and `plan_append` serve a decode step for all rows at once: one gather or scatter
  per array, in place (`mx.put_along_axis` on a buffer nothing else holds), no host sync;
- `take`, `extend`, `extract_row` and `from_stores` are mlx-lm's filter, extend, extract and merge.
"""

import mlx.core as mx

from .store import STEP, Buffers, TokenStore


def _slots(slots, shape):
    """Per-row slot indices (B,) as indices for take/put_along_axis on axis 2 of arrays of `shape`."""
    idx = mx.array(slots, mx.int32).reshape(len(slots), *(1,) * (len(shape) - 1))
    return mx.broadcast_to(idx, (shape[0], shape[1], 1, *shape[3:]))


class RaggedStore(Buffers):
    def __init__(self, batch: int, step: int = STEP, ring=None):
        self.step = step
        self.ring = ring  # (capacity, keep) or None, as TokenStore
        self.buffers = {}  # name -> (B, H, capacity, ...)
        self.lengths = [0] * batch
        self.starts = [0] * batch

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths, default=0)

    def row(self, b: int, owner=None) -> "RowStore":
        """Row b as a TokenStore (`owner.index` instead of b when given: the row moves on filter/extend)."""
        return RowStore(self, b if owner is None else owner)

    # ---- capacity --------------------------------------------------------------------------
    def _reserve(self, like: dict, need: int):
        """Room for `need` tokens in every row plus the spare slot; like: arrays (any B, H, n, ...)."""
        if need + 1 <= self.capacity and set(like) <= set(self.buffers):
            return
        cap = self.capacity
        grow = max(need + 1, cap + max(self.step, cap // 16))
        grow = -(-grow // self.step) * self.step
        if self.ring is not None:
            grow = max(need + 1, min(grow, self.ring[0] + 1))
        for k, a in like.items():
            old = self.buffers.get(k)
            new = mx.zeros((self.batch, a.shape[1], grow - (0 if old is None else cap), *a.shape[3:]), a.dtype)
            self.buffers[k] = new if old is None else mx.concatenate([old, new], axis=2)

    def _release(self):
        """Free the buffers once every row is empty."""
        if not any(self.lengths):
            self.buffers, self.starts = {}, [0] * self.batch

    # ---- one row (TokenStore's semantics) --------------------------------------------------------
    def view_row(self, b: int) -> dict:
        n = self.lengths[b]
        return {k: a[b : b + 1, :, :n] for k, a in self.buffers.items()}

    def ordered_row(self, b: int) -> dict:
        if self.starts[b] == 0:
            return self.view_row(b)
        keep, s = self.ring[1], self.starts[b]
        out = {}
        for k, a in self.view_row(b).items():
            rot = a[:, :, keep:]
            parts = [a[:, :, :keep], rot[:, :, s:], rot[:, :, :s]]
            out[k] = mx.concatenate([p for p in parts if p.shape[2]], axis=2)
        return out

    def linearize_row(self, b: int):
        if self.starts[b]:
            n = self.lengths[b]
            for k, a in self.ordered_row(b).items():
                self.buffers[k][b : b + 1, :, :n] = a
            self.starts[b] = 0

    def oldest_row(self, b: int) -> dict:
        slot = self.ring[1] + self.starts[b]
        return {k: a[b : b + 1, :, slot : slot + 1] for k, a in self.buffers.items()}

    def append_row(self, b: int, arrays: dict):
        """TokenStore.append on row b: arrays (1, H, n, ...)."""
        if not arrays:
            return
        n = next(iter(arrays.values())).shape[2]
        if self.ring is not None and n == 1 and self.lengths[b] == self.ring[0]:
            slot = self.ring[1] + self.starts[b]
            for k, a in arrays.items():
                self.buffers[k][b : b + 1, :, slot : slot + 1] = a
            self.starts[b] = (self.starts[b] + 1) % (self.ring[0] - self.ring[1])
            return
        self.linearize_row(b)
        at = self.lengths[b]
        self._reserve(arrays, at + n)
        for k, a in arrays.items():
            self.buffers[k][b : b + 1, :, at : at + n] = a
        self.lengths[b] = at + n

    def remove_row(self, b: int, start: int, n: int):
        """Delete row b's tokens [start, start + n) in temporal order, keeping order."""
        if n <= 0:
            return
        self.linearize_row(b)
        end = self.lengths[b]
        if start + n < end:
            for k, a in self.buffers.items():
                self.buffers[k][b : b + 1, :, start : end - n] = a[b : b + 1, :, start + n : end]
        self.lengths[b] = end - n
        self._release()

    def take_front_row(self, b: int, n: int) -> dict:
        self.linearize_row(b)
        front = {k: a[b : b + 1, :, :n] for k, a in self.buffers.items()}
        self.remove_row(b, 0, n)
        return front

    def trim_back_row(self, b: int, n: int):
        self.linearize_row(b)
        self.lengths[b] -= min(n, self.lengths[b])
        self._release()

    def load_row(self, b: int, arrays: dict):
        """Replace row b's tokens with arrays (1, H, n, ...) in temporal order."""
        self.lengths[b], self.starts[b] = 0, 0
        n = next(iter(arrays.values())).shape[2] if arrays else 0
        if n:
            self._reserve(arrays, max(n, self.longest))
            for k, a in arrays.items():
                self.buffers[k][b : b + 1, :, :n] = a
        self.lengths[b] = n
        self._release()

    def clear_row(self, b: int):
        self.lengths[b], self.starts[b] = 0, 0
        self._release()

    # ---- every row at once (a decode step) ------------------------------------------------------------
    def plan_append(self, b: int) -> int:
        """The slot where one appended token of row b goes (TokenStore.append of one token), counted in."""
        if self.ring is not None and self.lengths[b] == self.ring[0]:
            slot = self.ring[1] + self.starts[b]
            self.starts[b] = (self.starts[b] + 1) % (self.ring[0] - self.ring[1])
            return slot
        assert self.starts[b] == 0, "a ring not full is in temporal order"
        self.lengths[b] += 1
        return self.lengths[b] - 1

    def spare(self, b: int) -> int:
        """A slot of row b no reader looks at (its first free one, or the spare slot of a full ring)."""
        return self.lengths[b]

    def gather(self, slots) -> dict:
        """Each row's token at slots[b]: arrays (B, H, 1, ...)."""
        return {k: mx.take_along_axis(a, _slots(slots, a.shape), axis=2) for k, a in self.buffers.items()}

    def write(self, arrays: dict, slots):
        """arrays (B, H, 1, ...) into each row's slot slots[b] (from plan_append or spare), in place."""
        self._reserve(arrays, self.longest)
        for k, a in arrays.items():
            buf = self.buffers[k]
            self.buffers[k] = mx.put_along_axis(buf, _slots(slots, buf.shape), a.astype(buf.dtype), axis=2)

    # ---- batch structure ----------------------------------------------------------------------------
    def _trimmed(self, a: mx.array, cap: int) -> mx.array:
        if a.shape[2] >= cap:
            return a[:, :, :cap]
        return mx.concatenate([a, mx.zeros((*a.shape[:2], cap - a.shape[2], *a.shape[3:]), a.dtype)], axis=2)

    def take(self, rows):
        """Keep only the given rows, in that order (mlx-lm's filter); the capacity shrinks to the longest kept."""
        self.lengths = [self.lengths[i] for i in rows]
        self.starts = [self.starts[i] for i in rows]
        if self.buffers and rows:
            cap = self.longest + 1
            idx = mx.array(rows, mx.int32)
            self.buffers = {k: mx.take(a[:, :, : min(cap, a.shape[2])], idx, axis=0) for k, a in self.buffers.items()}
        self._release()

    def extend(self, other: "RaggedStore"):
        """Append other's rows after this store's (mlx-lm's extend)."""
        if self.buffers or other.buffers:
            like = self.buffers or other.buffers
            cap = max(self.capacity, other.capacity)
            parts = []
            for s in (self, other):
                bufs = s.buffers or {
                    k: mx.zeros((s.batch, a.shape[1], cap, *a.shape[3:]), a.dtype) for k, a in like.items()
                }
                parts.append({k: self._trimmed(a, cap) for k, a in bufs.items()})
            self.buffers = {k: mx.concatenate([parts[0][k], parts[1][k]], axis=0) for k in like}
        self.lengths = self.lengths + other.lengths
        self.starts = self.starts + other.starts

    def extract_row(self, b: int) -> TokenStore:
        """Row b as a TokenStore of its own: exactly sized, in temporal order, copied out of the batch."""
        st = TokenStore(self.step, self.ring)
        if self.lengths[b]:
            st.load({k: mx.contiguous(a) for k, a in self.ordered_row(b).items()})
        return st

    @classmethod
    def from_stores(cls, stores) -> "RaggedStore":
        """One row per TokenStore, each in temporal order (mlx-lm's merge)."""
        first = stores[0]
        out = cls(len(stores), first.step, first.ring)
        rows = [st.ordered() if st.length else {} for st in stores]
        like = next((r for r in rows if r), None)
        if like is not None:
            out._reserve(like, max(st.length for st in stores))
            for b, r in enumerate(rows):
                for k, a in r.items():
                    out.buffers[k][b : b + 1, :, : a.shape[2]] = a
                out.lengths[b] = stores[b].length
        return out

    def copy(self) -> "RaggedStore":
        new = RaggedStore(self.batch, self.step, self.ring)
        new.buffers = {k: mx.array(a) for k, a in self.buffers.items()}
        new.lengths, new.starts = list(self.lengths), list(self.starts)
        return new


class RowStore:
    """Row `index` of a RaggedStore with TokenStore's interface (what TurboQuantKVCache calls).

    owner: an int, or an object whose `.index` is the row (it changes as the batch is filtered or extended)."""

    def __init__(self, ragged: RaggedStore, owner):
        self.ragged = ragged
        self.owner = owner

    @property
    def b(self) -> int:
        return self.owner if isinstance(self.owner, int) else self.owner.index

    @property
    def ring(self):
        return self.ragged.ring

    @property
    def step(self) -> int:
        return self.ragged.step

    @property
    def length(self) -> int:
        return self.ragged.lengths[self.b]

    @property
    def start(self) -> int:
        return self.ragged.starts[self.b]

    @property
    def capacity(self) -> int:
        return self.ragged.capacity

    @property
    def buffers(self) -> dict:
        """This row's full-capacity buffers (1, H, capacity, ...) (kernels read the first `length`)."""
        b = self.b
        return {k: a[b : b + 1] for k, a in self.ragged.buffers.items()}

    @property
    def nbytes(self) -> int:
        return self.ragged.nbytes // max(self.ragged.batch, 1)

    def view(self) -> dict:
        return self.ragged.view_row(self.b)

    def ordered(self) -> dict:
        return self.ragged.ordered_row(self.b)

    def linearize(self):
        self.ragged.linearize_row(self.b)

    def oldest(self) -> dict:
        return self.ragged.oldest_row(self.b)

    def append(self, arrays: dict):
        self.ragged.append_row(self.b, arrays)

    def take_front(self, n: int) -> dict:
        return self.ragged.take_front_row(self.b, n)

    def remove(self, start: int, n: int):
        self.ragged.remove_row(self.b, start, n)

    def trim_back(self, n: int):
        self.ragged.trim_back_row(self.b, n)

    def load(self, arrays: dict):
        self.ragged.load_row(self.b, arrays)

    def clear(self):
        self.ragged.clear_row(self.b)

    def copy(self) -> TokenStore:
        return self.ragged.extract_row(self.b)
