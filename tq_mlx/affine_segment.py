"""A rotated-domain segment stored on a uniform grid in MLX's affine format.

The CPU speed option: the rotated (centred, weighted) vectors are quantized
with `mx.quantize` (one fp16 scale and bias per group) so attention runs on
MLX's own `quantized_matmul` kernels, on the CPU and on Metal alike.  Same
interface as turboquant.Segment; the Lloyd-Max segment has lower distortion
per bit (docs/turboquant.md, "The uniform grid").
"""

import mlx.core as mx

AFFINE_BITS = (2, 3, 4, 5, 6, 8)


def affine_group(n: int) -> int:
    """The largest MLX group size (128, 64, 32) that divides n."""
    for g in (128, 64, 32):
        if n % g == 0:
            return g
    raise ValueError(f"the uniform (affine) grid needs a size divisible by 32, got {n}; use the Lloyd-Max codec")


class AffineSegment:
    """n rotated coordinates at `bits` on MLX's affine grid; stores codes, scales, biases (B, H, T, ...)."""

    side_nbytes = 0
    qjl = False

    def __init__(self, n: int, bits: int):
        if bits not in AFFINE_BITS:
            raise ValueError(f"the uniform (affine) grid supports bits {AFFINE_BITS}, got {bits}")
        self.n, self.bits, self.group = n, bits, affine_group(n)

    def stored_bits(self, norm_bits: int = 16) -> float:
        return self.bits + 32 / self.group

    def encode(self, y: mx.array, norm_dtype) -> dict:
        w, s, b = mx.quantize(y, group_size=self.group, bits=self.bits)
        return {"codes": w, "scales": s.astype(mx.float16), "biases": b.astype(mx.float16)}

    def _qargs(self, enc):
        return (enc["codes"], enc["scales"].astype(mx.float32), enc["biases"].astype(mx.float32))

    def decode(self, enc: dict) -> mx.array:
        return mx.dequantize(*self._qargs(enc), group_size=self.group, bits=self.bits)

    def scores(self, q: mx.array, enc: dict) -> mx.array:
        return mx.quantized_matmul(q, *self._qargs(enc), transpose=True, group_size=self.group, bits=self.bits)

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        return mx.quantized_matmul(p, *self._qargs(enc), transpose=False, group_size=self.group, bits=self.bits)
