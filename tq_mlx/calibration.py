"""Statistics a codec learns from the first tokens it sees (per layer, head, K or V).

Each is exact for attention whatever its value (it only moves quantization
error), and each is shrunk toward "no change" when it rests on few tokens.
"""

import mlx.core as mx
import numpy as np


def outlier_channels(x: mx.array) -> mx.array:
    """Per-head channel order, largest mean square over the data first: x (B, H, T, d) -> int32 (H, d).

    The outlier split takes its high-bit segment from the front of this order."""
    energy = mx.mean(x.astype(mx.float32) ** 2, axis=(0, 2))  # (H, d)
    return mx.argsort(-energy, axis=-1).astype(mx.int32)


PRIOR_TOKENS = 8  # calibration statistics shrink toward "no change" as if from this many tokens


class QueryStats:
    """Second moments of the queries seen at the calibration positions, per KV head, kept per position.

    Accumulated over attention calls (a prefill may come in chunks), so the key codec can be built from
    the queries of exactly the first calibration tokens; kept per position, so that trimming the cache
    drops the trimmed tokens' queries too (a cache trimmed back to a prefix then calibrates as one that
    only saw the prefix: a server's prefix cache).  `full` also keeps the queries themselves, for the
    d x d moment (the whitening option).  A position that got no queries counts none."""

    def __init__(self, n_heads: int, d: int, full: bool = False):
        self.rows = mx.zeros((0, n_heads, d), mx.float32)  # per position: sum of q^2 over its queries
        self.counts = []  # per position: how many queries
        self.raw = mx.zeros((0, n_heads, 0, d), mx.float32) if full else None  # (P, H, queries, d)
        self.base = None  # (sq, n, outer) of a state saved before per-position statistics: not split by trims

    @classmethod
    def of(cls, q: mx.array, full: bool = False) -> "QueryStats":
        """Statistics of queries q (B, H, L, d), one per position."""
        qs = cls(q.shape[1], q.shape[3], full)
        qs.add(q[:, :, None])
        return qs

    @property
    def positions(self) -> int:
        return len(self.counts)

    @property
    def n(self) -> int:
        return sum(self.counts) + (0 if self.base is None else self.base[1])

    @property
    def sq(self) -> mx.array:
        s = self.rows.sum(axis=0)
        return s if self.base is None else s + self.base[0]

    @property
    def outer(self):
        if self.raw is None:
            return None
        P, H, M, d = self.raw.shape
        qh = mx.swapaxes(self.raw, 0, 1).reshape(H, P * M, d)
        out = mx.swapaxes(qh, -1, -2) @ qh
        return out if self.base is None or self.base[2] is None else out + self.base[2]

    def add(self, q: mx.array, first: int = None):
        """q (B, H, G, L, d): the G queries per KV head of L positions from `first` (default: the next one);
        positions from `first` on that were recorded before are replaced."""
        first = self.positions if first is None else first
        self.truncate(first)
        B, H, G, L, d = q.shape
        q = q.astype(mx.float32)
        gap = first - self.positions  # positions that got no queries
        rows = mx.swapaxes((q * q).sum(axis=(0, 2)), 0, 1)  # (L, H, d)
        self.rows = mx.concatenate([self.rows, mx.zeros((gap, H, d)), rows])
        self.counts += [0] * gap + [B * G] * L
        if self.raw is not None:
            if self.raw.shape[0] and self.raw.shape[2] != B * G:
                raise ValueError(f"queries per position changed from {self.raw.shape[2]} to {B * G}")
            raw = q.transpose(3, 1, 0, 2, 4).reshape(L, H, B * G, d)
            self.raw = mx.concatenate([self.raw.reshape(-1, H, B * G, d), mx.zeros((gap, H, B * G, d)), raw])

    def truncate(self, positions: int):
        """Forget the queries of positions from `positions` on."""
        if positions < self.positions:
            self.rows, self.counts = self.rows[:positions], self.counts[:positions]
            self.raw = None if self.raw is None else self.raw[:positions]

    def mean_sq(self) -> mx.array:
        return self.sq / max(self.n, 1)

    def state(self) -> dict:
        out = {"rows": self.rows, "counts": mx.array(self.counts, mx.int32)}
        if self.base is not None:
            out.update({"sq": self.base[0], "n": mx.array(self.base[1])})
            out.update({} if self.base[2] is None else {"outer": self.base[2]})
        return out if self.raw is None else {**out, "raw": self.raw}

    def copy(self) -> "QueryStats":
        new = QueryStats.__new__(QueryStats)
        new.__dict__.update(self.__dict__)  # arrays are immutable: sharing is a copy
        new.counts = list(self.counts)
        return new

    @classmethod
    def from_state(cls, st: dict) -> "QueryStats":
        """The statistics saved by `state()`; a state saved before per-position statistics ("sq", "n",
        "outer") is kept whole, as `base`."""
        qs = cls.__new__(cls)
        rows = st.get("rows")
        if rows is None:  # before per-position statistics
            sq = st["sq"]
            rows = mx.zeros((0, *sq.shape), mx.float32)
        qs.rows, qs.counts = rows, [int(c) for c in np.array(st.get("counts", mx.zeros((0,), mx.int32)))]
        if len(qs.counts) != rows.shape[0]:
            raise ValueError(f"query statistics for {rows.shape[0]} positions but {len(qs.counts)} counts")
        full = "raw" in st or "outer" in st
        qs.raw = st.get("raw", mx.zeros((0, *rows.shape[1:2], 0, rows.shape[2]), mx.float32) if full else None)
        qs.base = (st["sq"], int(st["n"].item()), st.get("outer")) if "sq" in st else None
        return qs


def _shrink(stat: mx.array, n: int, prior) -> mx.array:
    """(n * stat + n0 * prior) / (n + n0): few calibration tokens move little from the prior."""
    return (n * stat + PRIOR_TOKENS * prior) / (n + PRIOR_TOKENS)


def channel_mean(x: mx.array) -> mx.array:
    """Per-head channel mean of x (B, H, T, d), shrunk toward 0: float32 (H, d)."""
    n = x.shape[0] * x.shape[2]
    return _shrink(mx.mean(x.astype(mx.float32), axis=(0, 2)), n, 0.0)


def query_weights(x: mx.array, q: QueryStats, mean=None) -> mx.array:
    """Channel weights w = (E q^2 / E k^2)^(1/4) per head, geometric mean 1: float32 (H, d).

    x: keys (B, H, T, d); q: the calibration queries' statistics.  With
    k' = w k and q' = q / w the score error of isotropic quantization noise,
    sum_i q_i^2 / w_i^2 * sum_i w_i^2 k_i^2, is minimal (Cauchy-Schwarz).
    """
    x = x.astype(mx.float32)
    if mean is not None:
        x = x - mean[:, None, :]
    ek = mx.mean(x * x, axis=(0, 2))
    eq = q.mean_sq()
    ek = _shrink(ek, x.shape[0] * x.shape[2], mx.mean(ek, axis=-1, keepdims=True))
    eq = _shrink(eq, q.n, mx.mean(eq, axis=-1, keepdims=True))
    ratio = (eq + 1e-6 * mx.mean(eq, axis=-1, keepdims=True)) / (ek + 1e-6 * mx.mean(ek, axis=-1, keepdims=True))
    w = mx.clip(ratio, 1e-4, 1e4) ** 0.25
    return w / mx.exp(mx.mean(mx.log(w), axis=-1, keepdims=True))


def query_whitening(x: mx.array, q: QueryStats, mean=None) -> mx.array:
    """Matrices A per head minimising the score error of isotropic noise on A k: float32 (H, d, d).

    With Sk, Sq the key and query second moments (shrunk toward isotropic),
    A^T A = Sk^-1/2 (Sk^1/2 Sq Sk^1/2)^1/2 Sk^-1/2; A is its symmetric square root, det 1.
    """
    x = np.array(x.astype(mx.float32), dtype=np.float64)
    if mean is not None:
        x = x - np.array(mean, dtype=np.float64)[None, :, None, :]

    def shrunk(s, n):
        iso = np.trace(s, axis1=1, axis2=2)[:, None, None] / s.shape[-1] * np.eye(s.shape[-1])
        n0 = s.shape[-1]  # a d x d moment needs about d tokens before it is trusted
        return (n * s + n0 * iso) / (n + n0)

    def moment(a):
        n = a.shape[0] * a.shape[2]
        a = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1, a.shape[3])
        return shrunk(np.einsum("hnd,hne->hde", a, a) / a.shape[1], n)

    def psd_pow(m, p):
        w, v = np.linalg.eigh(m)
        w = np.maximum(w, 1e-12 * w.max(axis=-1, keepdims=True))
        return (v * w[..., None, :] ** p) @ np.swapaxes(v, -1, -2)

    sk = moment(x)
    sq = shrunk(np.array(q.outer, dtype=np.float64) / max(q.n, 1), q.n)
    sk_h, sk_ih = psd_pow(sk, 0.5), psd_pow(sk, -0.5)
    ata = sk_ih @ psd_pow(sk_h @ sq @ sk_h, 0.5) @ sk_ih
    a = psd_pow(ata, 0.5)
    a /= np.exp(np.linalg.slogdet(a)[1] / a.shape[-1])[:, None, None]
    return mx.array(a.astype(np.float32))
