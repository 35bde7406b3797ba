"""Seeded random rotations: dense Haar and randomized Hadamard.

Every rotation is materialised as an orthogonal float32 matrix R of shape
(d, d) with y = x @ R.T (rotate) and x = y @ R (inverse).  The reference path
uses the matrix; a Hadamard rotation can also be applied with
`mx.hadamard_transform`, whose supported sizes are validated here.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np

KINDS = ("haar", "hadamard")
_PART = {"k": 0, "v": 1}


def derive_seed(seed: int, layer: int, head: int, part: str, sub: int = 0) -> int:
    """A 63-bit seed for one (layer, head, K or V, sub-instance); stable across runs and platforms."""
    if part not in _PART:
        raise ValueError(f"part must be 'k' or 'v', got {part!r}")
    ss = np.random.SeedSequence([int(seed), int(layer), int(head), _PART[part], int(sub)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def haar_matrix(d: int, seed: int) -> np.ndarray:
    """Haar-distributed orthogonal (d, d) float64: QR of a Gaussian matrix, signs of R's diagonal fixed."""
    g = np.random.default_rng(seed).standard_normal((d, d))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


def hadamard_supported(d: int) -> bool:
    """True when mx.hadamard_transform is exact for size d.

    MLX documents n = m * 2^k with m in (1, 12, 20, 28), but returns wrong
    values for some such sizes; only powers of two from 16 to 8192 are trusted.
    """
    return 16 <= d <= 8192 and d & (d - 1) == 0


def _sylvester(d: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


def hadamard_matrix(d: int, seed: int) -> np.ndarray:
    """Randomized Hadamard H @ diag(s), s random signs: orthogonal (d, d) float64."""
    if not hadamard_supported(d):
        raise ValueError(f"randomized Hadamard needs a power-of-two size 16..8192, got d={d}")
    s = np.random.default_rng(seed).choice([-1.0, 1.0], size=d)
    return _sylvester(d) * s[None, :]


def hadamard_signs(d: int, seed: int) -> np.ndarray:
    """The random signs s of hadamard_matrix(d, seed), for `mx.hadamard_transform(x * s)`."""
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=d).astype(np.float32)


def resolve_kind(kind: str, d: int) -> str:
    """The rotation actually used: 'hadamard' falls back to 'haar' for sizes it can't do; 'auto' prefers Hadamard."""
    if kind not in KINDS + ("auto",):
        raise ValueError(f"unknown rotation {kind!r}; allowed: {KINDS + ('auto',)}")
    if kind in ("hadamard", "auto"):
        return "hadamard" if hadamard_supported(d) else "haar"
    return kind


@lru_cache(maxsize=4096)
def rotation_matrix(d: int, seed: int, kind: str = "haar") -> np.ndarray:
    """Orthogonal float32 (d, d) for one seed; read-only and cached."""
    kind = resolve_kind(kind, d)
    m = haar_matrix(d, seed) if kind == "haar" else hadamard_matrix(d, seed)
    m = m.astype(np.float32)
    m.setflags(write=False)
    return m


class HeadRotation:
    """One orthogonal transform per head, applied to x of shape (B, H, T, d).

    R = blockdiag(R_1, ..., R_m) P: an optional per-head channel permutation P
    (perm, int32 (H, d), or (B, H, d) per batch row; the outlier split puts its chosen channels first),
    then one rotation per block of `sizes`.  A block of power-of-two size uses
    a randomized Hadamard transform (only its signs are held); any other size
    a dense Haar matrix.  Seeds come from `seeds[h][block]`.
    """

    def __init__(self, sizes, seeds, kind: str = "auto", perm=None):
        self.sizes = [int(n) for n in sizes]
        self.d = sum(self.sizes)
        self.kind = kind
        self.perm = None if perm is None else mx.array(perm).astype(mx.int32)
        self.inv_perm = None if perm is None else mx.argsort(self.perm, axis=-1).astype(mx.int32)
        self.blocks = []  # (kind, data): signs (H, 1, n) or matrices (H, n, n)
        for b, n in enumerate(self.sizes):
            k = resolve_kind(kind, n)
            if k == "hadamard":
                data = mx.array(np.stack([hadamard_signs(n, s[b]) for s in seeds]))[:, None, :]
            else:
                data = mx.array(np.stack([rotation_matrix(n, s[b], "haar") for s in seeds]))
            self.blocks.append((k, data))

    @property
    def nbytes(self) -> int:
        extra = 0 if self.perm is None else self.perm.nbytes + self.inv_perm.nbytes
        return extra + sum(data.nbytes for _, data in self.blocks)

    def _split(self, x):
        if len(self.sizes) == 1:
            return [x]
        cuts = np.cumsum(self.sizes)[:-1].tolist()
        return mx.split(x, cuts, axis=-1)

    def forward(self, x: mx.array) -> mx.array:
        """y = R x for x (B, H, T, d) float32; same shape."""
        if self.perm is not None:
            x = mx.take_along_axis(x, self._per_head(self.perm, x), axis=-1)
        out = []
        for xb, (k, data) in zip(self._split(x), self.blocks):
            out.append(mx.hadamard_transform(xb * data) if k == "hadamard" else xb @ mx.swapaxes(data, -1, -2))
        return out[0] if len(out) == 1 else mx.concatenate(out, axis=-1)

    def inverse(self, y: mx.array) -> mx.array:
        """x = R^T y for y (B, H, T, d); same shape."""
        out = []
        for yb, (k, data) in zip(self._split(y), self.blocks):
            out.append(mx.hadamard_transform(yb) * data if k == "hadamard" else yb @ data)
        x = out[0] if len(out) == 1 else mx.concatenate(out, axis=-1)
        if self.inv_perm is not None:
            x = mx.take_along_axis(x, self._per_head(self.inv_perm, x), axis=-1)
        return x

    @staticmethod
    def _per_head(perm: mx.array, x: mx.array) -> mx.array:
        """perm (H, d), or (B, H, d) for batch rows with orders of their own, as indices for x (B, H, T, d)."""
        p = perm.reshape(-1, perm.shape[-2], 1, perm.shape[-1])
        return mx.broadcast_to(p, (max(p.shape[0], x.shape[0]), p.shape[1], x.shape[2], p.shape[3]))

    def matrix(self) -> mx.array:
        """The dense transforms, float32 (H, d, d), with y = x @ M^T (for kernels and tests)."""
        h = self.blocks[0][1].shape[0]
        eye = mx.broadcast_to(mx.eye(self.d)[None, None], (1, h, self.d, self.d))
        return mx.swapaxes(self.forward(eye)[0], -1, -2)
