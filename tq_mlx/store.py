"""A growable set of arrays that share a token axis (axis 2, shape (B, H, T, ...)).

Capacity grows in steps of STEP tokens (like mlx-lm's KVCache, which uses 256),
so appending a decode token writes in place instead of copying the whole cache.
Codes are 4 to 8x smaller than fp16, so a smaller step keeps the slack of short
caches small at no real cost: one copy of the store per 64 appended tokens.
"""

import mlx.core as mx

STEP = 64


class TokenStore:
    def __init__(self, step: int = STEP):
        self.step = step
        self.buffers = {}  # name -> (B, H, capacity, ...)
        self.length = 0

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2] if self.buffers else 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def view(self) -> dict:
        """Arrays sliced to the stored length."""
        return {k: b[:, :, : self.length] for k, b in self.buffers.items()}

    def append(self, arrays: dict):
        """Add T new tokens: arrays of shape (B, H, T, ...), the same names every call."""
        if not arrays:
            return
        n = next(iter(arrays.values())).shape[2]
        if self.length + n > self.capacity:
            grow = (self.length + n + self.step - 1) // self.step * self.step - self.length
            for k, a in arrays.items():
                new = mx.zeros((*a.shape[:2], grow, *a.shape[3:]), a.dtype)
                old = self.buffers.get(k)
                if old is not None:
                    old = old[:, :, : self.length]
                self.buffers[k] = new if old is None else mx.concatenate([old, new], axis=2)
        for k, a in arrays.items():
            self.buffers[k][:, :, self.length : self.length + n] = a
        self.length += n

    def take_front(self, n: int) -> dict:
        """Remove and return the oldest n tokens (sliced copies)."""
        front = {k: b[:, :, :n] for k, b in self.buffers.items()}
        self.remove(0, n)
        return front

    def remove(self, start: int, n: int):
        """Delete tokens [start, start + n), keeping order."""
        if n <= 0:
            return
        for k, b in self.buffers.items():
            self.buffers[k] = mx.concatenate([b[:, :, :start], b[:, :, start + n : self.length]], axis=2)
        self.length -= n

    def trim_back(self, n: int):
        """Forget the newest n tokens (capacity is kept)."""
        self.length -= min(n, self.length)

    def load(self, arrays: dict):
        """Replace the contents with arrays of equal token length."""
        self.buffers = dict(arrays)
        self.length = next(iter(arrays.values())).shape[2] if arrays else 0

    def copy(self) -> "TokenStore":
        new = TokenStore(self.step)
        new.buffers = {k: mx.array(b) for k, b in self.buffers.items()}
        new.length = self.length
        return new
