"""The fp16 passthrough codec: tokens kept as float16 in the original domain.

Its encoding is {"x": float16 (B, H, T, d)}; the cache's fp16 blocks (sink tokens,
the recent-token window) use the same format, so every block reads the same way.
"""

import mlx.core as mx

FP_KEY = "x"


class Float16Codec:
    """Passthrough (the `codec.Codec` interface): the "fp16" preset and the cache's fp16 blocks."""

    side_nbytes = 0
    bits_per_element = 16.0
    encode_block = 1
    mean_rot = None

    def encode(self, x: mx.array) -> dict:
        return {FP_KEY: x.astype(mx.float16)}

    def decode(self, enc: dict) -> mx.array:
        return enc[FP_KEY].astype(mx.float32)

    decode_stored = decode

    def rotate_query(self, q):
        return q.astype(mx.float32)

    to_stored = rotate_query

    def unrotate(self, acc):
        return acc

    def scores(self, q: mx.array, enc: dict) -> mx.array:
        return q @ mx.swapaxes(enc[FP_KEY].astype(mx.float32), -1, -2)

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        return p @ enc[FP_KEY].astype(mx.float32)

    def constants(self) -> list:
        return []

    def calibration_state(self) -> dict:
        return {}

    def kernel_reason(self):
        return None  # fp16 blocks are read with MLX ops next to the kernels


FP16 = Float16Codec()
