"""Metal kernels for TurboQuant attention: loader and launchers.

Kernel bodies live in `tq_mlx.metal_kernels/*.metal` (shipped as package data)
and are built lazily with `mx.fast.metal_kernel`, so a CPU emulator patched
in later (metal_emu's `patched_mlx()`) takes effect.  Built kernels are cached
per (metal_kernel factory, kernel name); template values (D, bits, G, dtypes)
are compile-time only, while token counts and block sizes travel as a small
int32 `params` input, so decoding never recompiles.

Kernels:
- tq_decode: decode attention (L = 1) on packed K/V codes, one (batch*kv head,
  key block) per threadgroup of NSG=8 simdgroups; returns un-normalised
  rotated-domain output with its max and sum-exp (single pass when NB = 1).
- tq_merge: split-K merge of tq_decode's partial blocks.
- tq_dequant: codes -> n * c[idx] in the rotated domain (prefill).
- tq_encode: rotated vectors -> packed codes + norms (one segment, no QJL).
"""

import os
from importlib import resources

import mlx.core as mx

NSG = 8  # simdgroups per threadgroup in tq_decode (the constexpr in the .metal file)
SINGLE_PASS_MAX = 2048  # tokens up to which decode runs as one pass per KV head
MIN_BLOCK = 256  # keys per split-K block, at least
MAX_BLOCKS = 128  # split-K blocks per KV head, at most
SUPPORTED_D = (64, 80, 96, 128, 256)
MAX_BITS = 8

MODES = ("auto", "reference", "metal")

_SOURCES = {}
_KERNELS = {}

_SPECS = {
    "tq_decode": (["q", "kc", "kn", "vc", "vn", "kcb", "vcb", "params"], ["out_o", "out_m", "out_l"]),
    "tq_merge": (["po", "pm", "pl"], ["out_o", "out_m", "out_l"]),
    "tq_dequant": (["codes", "norm", "cb", "params"], ["y"]),
    "tq_encode": (["y", "levels", "edges"], ["codes", "norm"]),
}


def source(name: str) -> str:
    """The .metal body text of kernel `name`."""
    if name not in _SOURCES:
        _SOURCES[name] = resources.files("tq_mlx.metal_kernels").joinpath(f"{name}.metal").read_text()
    return _SOURCES[name]


def kernel(name: str):
    """The built kernel `name`, for the mx.fast.metal_kernel currently installed (built on first use)."""
    factory = mx.fast.metal_kernel
    key = (factory, name)
    k = _KERNELS.get(key)
    if k is None:
        inputs, outputs = _SPECS[name]
        k = factory(name=name, input_names=inputs, output_names=outputs, source=source(name))
        _KERNELS[key] = k
    return k


def mode() -> str:
    """TQ_MLX_ATTENTION: "auto" (default), "reference" or "metal"."""
    m = os.environ.get("TQ_MLX_ATTENTION", "auto")
    if m not in MODES:
        raise ValueError(f"TQ_MLX_ATTENTION must be one of {MODES}, got {m!r}")
    return m


def enabled() -> bool:
    """True when the kernels serve this process: TQ_MLX_ATTENTION=metal (on a machine without Metal
    that only works under an emulator such as metal_emu's patched_mlx()), or auto with a Metal back-end."""
    m = mode()
    return m == "metal" or (m == "auto" and mx.metal.is_available())


def _params(*vals):
    return mx.array(list(vals), dtype=mx.int32)


def num_blocks(T: int, block=None):
    """(keys per block, blocks) for T tokens: one pass up to SINGLE_PASS_MAX, split-K beyond.

    block (tests) imposes the keys per block."""
    if block is not None:
        block = max(1, int(block))
        return block, -(-T // block)
    if T <= SINGLE_PASS_MAX:
        return T, 1
    blk = max(MIN_BLOCK, -(-T // MAX_BLOCKS))
    blk = -(-blk // 32) * 32
    return blk, -(-T // blk)


def decode_partial(q, kc, kn, vc, vn, kcb, vcb, T: int, block: int, nblocks: int):
    """Raw tq_decode launch.

    q (BH, G, D) float32; kc/vc (B, H, cap, words) uint32 and kn/vn (B, H, cap) norms (the
    store's full buffers: only the first T tokens are read); kcb/vcb float32 codebooks.
    Returns o (BH, NB, G, D), m (BH, NB, G), l (BH, NB, G) float32.
    """
    BH, G, D = q.shape
    kbits = int(kcb.shape[0]).bit_length() - 1
    vbits = int(vcb.shape[0]).bit_length() - 1
    k = kernel("tq_decode")
    o, m, l = k(
        inputs=[
            q.astype(mx.float32),
            kc,
            kn,
            vc,
            vn,
            kcb.astype(mx.float32),
            vcb.astype(mx.float32),
            _params(T, block),
        ],
        template=[("NT", kn.dtype), ("D", D), ("KB", kbits), ("VB", vbits), ("G", G)],
        grid=(32 * NSG, BH, nblocks),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=[(BH, nblocks, G, D), (BH, nblocks, G), (BH, nblocks, G)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    return o, m, l


def merge(o, m, l):
    """tq_merge: (R, NB, D), (R, NB), (R, NB) -> (R, D), (R,), (R,)."""
    R, NB, D = o.shape
    tx = min(64, D)
    k = kernel("tq_merge")
    return k(
        inputs=[o, m, l],
        grid=(D, R, 1),
        threadgroup=(tx, 1, 1),
        output_shapes=[(R, D), (R,), (R,)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )


def decode_attention(q, kc, kn, vc, vn, kcb, vcb, T: int, block=None):
    """Decode attention over the first T coded tokens: q (BH, G, D) pre-rotated and pre-scaled.

    Returns (o, m, l): o (BH, G, D) un-normalised rotated-domain output, m and l (BH, G) its max and
    sum-exp, so the caller merges it exactly with other key blocks (the fp16 window, sinks).
    """
    BH, G, D = q.shape
    block, nb = num_blocks(T, block)
    o, m, l = decode_partial(q, kc, kn, vc, vn, kcb, vcb, T, block, nb)
    if nb == 1:
        return o[:, 0], m[:, 0], l[:, 0]
    o = mx.swapaxes(o, 1, 2).reshape(BH * G, nb, D)
    m = mx.swapaxes(m, 1, 2).reshape(BH * G, nb)
    l = mx.swapaxes(l, 1, 2).reshape(BH * G, nb)
    o, m, l = merge(o, m, l)
    return o.reshape(BH, G, D), m.reshape(BH, G), l.reshape(BH, G)


def dequantize(codes, norm, cb, T: int, D: int, out_dtype=mx.float16, rows_per_tg: int = 8):
    """tq_dequant: codes (B, H, cap, words) + norms (B, H, cap) -> n * c[idx] (B, H, T, D) in out_dtype."""
    B, H = norm.shape[:2]
    bits = int(cb.shape[0]).bit_length() - 1
    rows = B * H * T
    k = kernel("tq_dequant")
    (y,) = k(
        inputs=[codes, norm, cb.astype(mx.float32), _params(T)],
        template=[("NT", norm.dtype), ("OT", out_dtype), ("D", D), ("BITS", bits)],
        grid=(32, rows, 1),
        threadgroup=(32, rows_per_tg, 1),
        output_shapes=[(B, H, T, D)],
        output_dtypes=[out_dtype],
    )
    return y


def encode_rotated(y, levels, edges, norm_dtype=mx.float16, norm_correction=True, rows_per_tg: int = 8):
    """tq_encode: rotated y (..., D) -> (codes (..., NG*bits) uint32, norm (...) norm_dtype), like Segment.encode."""
    lead, D = y.shape[:-1], y.shape[-1]
    bits = int(levels.shape[0]).bit_length() - 1
    rows = 1
    for n in lead:
        rows *= n
    words = -(-D // 32) * bits
    k = kernel("tq_encode")
    codes, norm = k(
        inputs=[y.astype(mx.float32).reshape(rows, D), levels.astype(mx.float32), edges.astype(mx.float32)],
        template=[("NT", norm_dtype), ("D", D), ("BITS", bits), ("NC", int(bool(norm_correction)))],
        grid=(32, rows, 1),
        threadgroup=(32, rows_per_tg, 1),
        output_shapes=[(rows, words), (rows,)],
        output_dtypes=[mx.uint32, norm_dtype],
    )
    return codes.reshape(*lead, words), norm.reshape(lead)
