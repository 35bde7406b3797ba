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
    """Second moments of the queries seen at the calibration positions, per KV head.

    Accumulated over attention calls (a prefill may come in chunks), so the key codec can be
    built from the queries of exactly the first calibration tokens.  `full` also keeps the
    d x d moment (the whitening option)."""

    def __init__(self, n_heads: int, d: int, full: bool = False):
        self.n = 0
        self.sq = mx.zeros((n_heads, d), mx.float32)
        self.outer = mx.zeros((n_heads, d, d), mx.float32) if full else None

    @classmethod
    def of(cls, q: mx.array, full: bool = False) -> "QueryStats":
        """Statistics of queries q (B, H, M, d)."""
        qs = cls(q.shape[1], q.shape[3], full)
        qs.add(q)
        return qs

    def add(self, q: mx.array):
        """q (B, H, M, d): queries grouped per KV head."""
        q = q.astype(mx.float32)
        self.n += q.shape[0] * q.shape[2]
        self.sq = self.sq + (q * q).sum(axis=(0, 2))
        if self.outer is not None:
            qh = mx.swapaxes(q, 0, 1).reshape(q.shape[1], -1, q.shape[3])
            self.outer = self.outer + mx.swapaxes(qh, -1, -2) @ qh

    def mean_sq(self) -> mx.array:
        return self.sq / max(self.n, 1)

    def state(self) -> dict:
        out = {"sq": self.sq, "n": mx.array(self.n)}
        return out if self.outer is None else {**out, "outer": self.outer}

    def copy(self) -> "QueryStats":
        new = QueryStats.__new__(QueryStats)
        new.n, new.sq, new.outer = self.n, self.sq, self.outer  # arrays are immutable: sharing is a copy
        return new

    @classmethod
    def from_state(cls, st: dict) -> "QueryStats":
        qs = cls.__new__(cls)
        qs.sq, qs.n, qs.outer = st["sq"], int(st["n"].item()), st.get("outer")
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
