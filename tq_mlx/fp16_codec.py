"""The fp16 passthrough codec: tokens kept as float16 in the original domain."""

import mlx.core as mx


class Float16Codec:
    """Passthrough: tokens kept as float16 in the original domain (the "fp16" preset and the fp16 window)."""

    side_nbytes = 0
    bits_per_element = 16.0

    def encode(self, x: mx.array, what: str = "input", validate: bool = True) -> dict:
        return {"x": x.astype(mx.float16)}

    def decode(self, enc: dict) -> mx.array:
        return enc["x"].astype(mx.float32)

    def rotate_query(self, q):
        return q.astype(mx.float32)

    def unrotate(self, acc):
        return acc

    def scores(self, q: mx.array, enc: dict) -> mx.array:
        return q @ mx.swapaxes(enc["x"].astype(mx.float32), -1, -2)

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        return p @ enc["x"].astype(mx.float32)


FP16 = Float16Codec()
