"""A set of arrays that share a token axis (axis 2, shape (B, H, T, ...)): growing, or a ring.

Growing (`ring=None`): appends write in place into spare capacity; when it runs
out, the buffers are copied into larger ones, by the larger of STEP tokens and
1/16 of the capacity (so long caches copy rarely and hold at most ~6% slack,
short ones at most STEP - 1 tokens; one append of n tokens into an empty store
allocates exactly n rounded up to STEP).

Ring (`ring=(capacity, keep)`): a sliding window as mlx-lm's RotatingKVCache.
The first `keep` slots hold the oldest tokens for good; once full, each new
token overwrites the oldest of the others, in place.  Slots are then not in
temporal order: `start` is the slot of the oldest rotating token, and
`ordered()` gives the tokens in temporal order (a copy) for callers that need it.
Attention at decode does not (softmax does not care about order).
"""

import mlx.core as mx

STEP = 64


class Buffers:
    """Named arrays (B, H, capacity, ...) sharing the token axis: what TokenStore and RaggedStore hold."""

    buffers: dict

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2] if self.buffers else 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())


class TokenStore(Buffers):
    def __init__(self, step: int = STEP, ring=None):
        self.step = step
        self.ring = ring  # (capacity, keep) or None
        self.buffers = {}  # name -> (B, H, capacity, ...)
        self.length = 0
        self.start = 0  # ring: slot of the oldest rotating token (relative to keep)

    def view(self) -> dict:
        """Arrays sliced to the stored length (slot order)."""
        return {k: b[:, :, : self.length] for k, b in self.buffers.items()}

    def _grow(self, arrays: dict, n: int):
        need = self.length + n
        if need <= self.capacity:
            return
        grow_to = max(need, self.capacity + max(self.step, self.capacity // 16))
        grow_to = -(-grow_to // self.step) * self.step
        if self.ring is not None:
            grow_to = max(need, min(grow_to, self.ring[0]))
        for k, a in arrays.items():
            new = mx.zeros((*a.shape[:2], grow_to - self.length, *a.shape[3:]), a.dtype)
            old = self.buffers.get(k)
            self.buffers[k] = new if old is None else mx.concatenate([old[:, :, : self.length], new], axis=2)

    def append(self, arrays: dict):
        """Add T new tokens: arrays of shape (B, H, T, ...), the same names every call.

        One token into a full ring overwrites the oldest rotating one, in place; anything else is
        appended in temporal order (a ring may then hold more than its capacity until the caller
        removes tokens)."""
        if not arrays:
            return
        n = next(iter(arrays.values())).shape[2]
        if self.ring is not None and n == 1 and self.length == self.ring[0]:
            slot = self._oldest_slot()
            for k, a in arrays.items():
                self.buffers[k][:, :, slot : slot + 1] = a
            self.start = (self.start + 1) % (self.ring[0] - self.ring[1])
            return
        self.linearize()
        self._grow(arrays, n)
        for k, a in arrays.items():
            self.buffers[k][:, :, self.length : self.length + n] = a
        self.length += n

    def _oldest_slot(self) -> int:
        return self.ring[1] + self.start

    def oldest(self) -> dict:
        """The token a one-token append into this full ring would overwrite, (B, H, 1, ...) each."""
        slot = self._oldest_slot()
        return {k: b[:, :, slot : slot + 1] for k, b in self.buffers.items()}

    def ordered(self) -> dict:
        """Arrays in temporal order (a ring that has wrapped is rotated: a copy)."""
        if self.start == 0:
            return self.view()
        keep = self.ring[1]
        out = {}
        for k, b in self.buffers.items():
            b = b[:, :, : self.length]
            rot = b[:, :, keep:]
            parts = [b[:, :, :keep], rot[:, :, self.start :], rot[:, :, : self.start]]
            out[k] = mx.concatenate([p for p in parts if p.shape[2]], axis=2)
        return out

    def linearize(self):
        """Put the slots in temporal order (start = 0)."""
        if self.start:
            self.buffers, self.start = self.ordered(), 0

    def take_front(self, n: int) -> dict:
        """Remove and return the oldest n tokens (temporal order).  Taking them all from buffers of at most one
        step keeps them (no copy: the next appends write in place, as after trim_back)."""
        self.linearize()
        front = {k: b[:, :, :n] for k, b in self.buffers.items()}
        if n >= self.length and self.capacity <= self.step:
            self.length = 0
        else:
            self.remove(0, n)
        return front

    def remove(self, start: int, n: int):
        """Delete tokens [start, start + n) in temporal order, keeping order (a copy)."""
        if n <= 0:
            return
        self.linearize()
        for k, b in self.buffers.items():
            self.buffers[k] = mx.concatenate([b[:, :, :start], b[:, :, start + n : self.length]], axis=2)
        self.length -= n

    def trim_back(self, n: int):
        """Forget the newest n tokens (capacity is kept)."""
        self.linearize()
        self.length -= min(n, self.length)

    def clear(self):
        """Forget every token and the buffers."""
        self.buffers, self.length, self.start = {}, 0, 0

    def load(self, arrays: dict):
        """Replace the contents with arrays of equal token length, in temporal order."""
        self.buffers = dict(arrays)
        self.length = next(iter(arrays.values())).shape[2] if arrays else 0
        self.start = 0

    def copy(self) -> "TokenStore":
        new = TokenStore(self.step, self.ring)
        new.buffers = {k: mx.array(b) for k, b in self.buffers.items()}
        new.length, new.start = self.length, self.start
        return new
