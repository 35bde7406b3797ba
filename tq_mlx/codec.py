"""The codec interface: how one of K or V of one layer is stored and read by attention.

A codec turns head-batched vectors x (B, H, T, d) into an *encoding*, a dict of
arrays whose leading dims are (B, H, T), and lets attention work on encodings
in its *stored domain* (for TurboQuant: rotated, centred and weighted) without
rebuilding fp vectors in the original domain:

    q_s = codec.rotate_query(q)          # queries into the stored domain, once per call
    s   = codec.scores(q_s, enc)         # <q, x~_t> for every stored token
    acc = codec.accumulate(p, enc)       # sum_t p_t x~_t, still in the stored domain
    out = codec.unrotate(acc)            # back to the original domain, once per call

Codecs: `turboquant.TurboQuant`, `hqmq.HQMQ`, `fp16_codec.Float16Codec`; each is
built by `codec_factory.build_codec` from a `CodecSpec` (one entry per codec in
`codec_factory.CODECS`).  This module also holds the input check and the norm
dtypes every codec shares.
"""

from typing import Protocol

import mlx.core as mx

NORM_DTYPES = {"float16": mx.float16, "float32": mx.float32}


class Codec(Protocol):
    """What attention and the cache use of a codec."""

    d: int  # vector length
    n_heads: int  # KV heads

    @property
    def side_nbytes(self) -> int:
        """Bytes of per-head constants held (rotations, learnt means and weights, tables)."""

    @property
    def bits_per_element(self) -> float:
        """Stored bits per vector coordinate, per-token side data (norms, scales) included."""

    encode_block: int  # tokens worth encoding together (1; more for a slow encoder: the cache stages them)

    @property
    def mean_rot(self) -> mx.array | None:
        """The centring mean in the stored domain, float32 (1, H, 1, d), or None.

        `scores` and `accumulate` add it back exactly; kernels that read the raw codes must too."""

    def encode(self, x: mx.array) -> dict:
        """Encoding of x (B, H, T, d) float; the caller has run `check_input`."""

    def decode(self, enc: dict) -> mx.array:
        """x~ (B, H, T, d) float32 in the original domain (tests and benchmarks)."""

    def decode_stored(self, enc: dict) -> mx.array:
        """x~ (B, H, T, d) float32 in the stored domain, centring mean included (prefill)."""

    def rotate_query(self, q: mx.array) -> mx.array:
        """Queries grouped per KV head, q (B, H, M, d), into the stored domain: float32."""

    def to_stored(self, x: mx.array) -> mx.array:
        """Raw vectors x (B, H, T, d) into the stored domain without centring, so that
        <rotate_query(q), to_stored(k)> = <q, k>: float32 (for fp16 tokens on the kernel path)."""

    def scores(self, q_stored: mx.array, enc: dict) -> mx.array:
        """<q, x~_t>: q_stored (B, H, M, d) -> (B, H, M, T) float32."""

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        """sum_t p_t x~_t in the stored domain: p (B, H, M, T) -> (B, H, M, d) float32."""

    def unrotate(self, acc: mx.array) -> mx.array:
        """Stored domain -> original domain: (B, H, M, d) float32."""

    def calibration_state(self) -> dict:
        """What the codec learnt from data (arrays), so `build_codec` rebuilds it identically."""

    def constants(self) -> list:
        """Every array the codec holds (evaluated once at build, so any thread can use them)."""

    def kernel_reason(self) -> str | None:
        """None when the Metal kernels can read this codec's encodings, else why not."""


def check_input(x: mx.array, d: int, what: str = "input", n_heads=None, finite: bool = True):
    """Reject a wrong shape (trailing dim d; (B, n_heads, T, d) when n_heads is given), a non-float
    dtype, or (finite=True) non-finite values, with a clear message.  The finiteness check reads
    the data back (a host sync): callers on the decode path check lazily instead."""
    if n_heads is not None and (x.ndim != 4 or x.shape[1] != n_heads):
        raise ValueError(f"{what} must have shape (B, {n_heads}, T, {d}), got {tuple(x.shape)}")
    if x.shape[-1] != d:
        raise ValueError(f"{what} has trailing dimension {x.shape[-1]}, this codec was built for d={d}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise TypeError(f"{what} must be float16, bfloat16 or float32, got {x.dtype}")
    if finite:
        bad = int((~mx.isfinite(x)).sum().item())
        if bad:
            raise ValueError(nonfinite_message(what, bad))


def nonfinite_message(what: str, bad=None) -> str:
    n = "" if bad is None else f"{bad} "
    return (
        f"{what} contains {n}non-finite value(s) (NaN or inf); TurboQuant rejects them "
        "rather than storing garbage codes. Nothing was encoded."
    )
