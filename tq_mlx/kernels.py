"""Metal kernels for TurboQuant attention: loader, launchers, and the switch that enables them.

Kernel bodies live in `tq_mlx.metal_kernels/*.metal` (shipped as package data, with the shared
helpers in `tq_common.h`) and are built lazily with `mx.fast.metal_kernel`, so a CPU emulator
patched in later (metal_emu's `patched_mlx()`) takes effect.  Template values (dtypes, D, bits,
G, the rotation kind) are compile-time only; token counts and block sizes travel as a small int32
`params` input, so decoding never recompiles.

Kernels:
- tq_encode: raw vectors -> centred, weighted, rotated, quantized, packed codes + norms.
- tq_decode: decode attention on the packed codes of one layer: partial (o, m, l) per key block,
  plus one block for the fp16 tokens (sinks, window) and exact ones; the query is rotated inside.  Each
  batch row has its own token counts (and, in a batch cache, its own codec constants).
- tq_merge: combines the partials, adds the value mean, rotates back, normalises: the output.
- tq_rope_bias: RoPE-centred keys: the turned key mean's score term per query row and block of positions,
  which tq_decode adds (one launch before it).
- tq_dequant: codes -> n * c[idx] in the stored domain (prefill).
- tq_viterbi: raw vectors -> centred, weighted, rotated, trellis-coded (the tail-biting Viterbi search of
  trellis.search), packed symbols + norms: tq_encode for the trellis presets.
A decode step is tq_encode twice (K, V) on update, then tq_decode and tq_merge (trellis presets: tq_viterbi
twice every 16th step, which encodes the 16 staged tokens).

`guarded(key, run)` runs the first use of each instantiation under a check: a compile or launch
error logs one warning naming it, and the caller falls back to the reference path for it.
"""

import contextlib
import logging
import os
from importlib import resources

import mlx.core as mx

log = logging.getLogger("tq_mlx")

NSG = 8  # simdgroups per threadgroup in tq_decode (the constexpr in the .metal file)
SUPPORTED_D = (64, 80, 96, 128, 256)
HADAMARD_D = (64, 128, 256)  # other sizes rotate with a dense matrix
MAX_BITS = 8
GPU_CORES = 40  # split-K aims at 4 threadgroups per core of an M-series Max-class GPU
MIN_BLOCK = 64  # keys per split-K block, at least
MODES = ("auto", "reference", "metal")

_SOURCES = {}
_KERNELS = {}
_VERIFIED = {}  # instantiation key -> True (ran) / False (failed: reference path)
_TRUSTED = []  # non-empty inside trusted(): launch without the first-use check (graph tracing)
_NO_SINKS = {}  # placeholder inputs (no sinks, no RoPE term), made once

_SPECS = {
    "tq_encode": (["x", "mean", "map", "levels", "edges", "params"], ["codes", "norm"]),
    "tq_decode": (
        ["q", "scale", "qmap", "kmr", "kc", "kn", "vc", "vn", "kcb", "vcb", "sk", "sv", "wk", "wv", "ek", "ev", "lens"]
        + ["kf", "kring", "params"],
        ["po", "pm", "pl"],
    ),
    "tq_merge": (["po", "pm", "pl", "vmr", "omap", "sinks", "params"], ["out"]),
    "tq_rope_bias": (["q", "scale", "ra", "rp", "rang", "params"], ["f"]),
    "tq_dequant": (["codes", "norm", "cb", "params"], ["y"]),
    "tq_viterbi": (["x", "mean", "map", "tbl", "params"], ["codes", "norm"]),
}
VITERBI_D = 256  # tq_viterbi's largest vector: D * 64 back-pointer bytes of threadgroup memory (16 KiB)


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


def source(name: str) -> str:
    """The text of kernel body `name` (or of a helper file such as "tq_common.h")."""
    if name not in _SOURCES:
        fname = name if "." in name else f"{name}.metal"
        _SOURCES[name] = resources.files("tq_mlx.metal_kernels").joinpath(fname).read_text()
    return _SOURCES[name]


def kernel(name: str):
    """The built kernel `name`, for the mx.fast.metal_kernel currently installed (built on first use)."""
    factory = mx.fast.metal_kernel
    key = (factory, name)
    k = _KERNELS.get(key)
    if k is None:
        inputs, outputs = _SPECS[name]
        k = factory(
            name=name, input_names=inputs, output_names=outputs, source=source(name), header=source("tq_common.h")
        )
        _KERNELS[key] = k
    return k


def guarded(key, run):
    """run() (launches returning arrays) for instantiation `key`; the first time, evaluated at once under a
    check.  Returns the arrays, or None when this instantiation failed (now or before): use the reference path."""
    key = (mx.fast.metal_kernel, *key)
    ok = _VERIFIED.get(key)
    if ok is False:
        return None
    if ok or _TRUSTED:
        return run()
    try:
        out = run()
        mx.eval(out)
    except Exception as e:  # noqa: BLE001 - any compile or launch error means: not this instantiation
        _VERIFIED[key] = False
        log.warning(
            "tq_mlx: Metal kernel %s failed (%s: %s); this configuration uses the reference path",
            key[1:],
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
        return None
    _VERIFIED[key] = True
    return out


@contextlib.contextmanager
def trusted():
    """Launch kernels without the first-use check (which evaluates): for tracing a step's graph."""
    _TRUSTED.append(True)
    try:
        yield
    finally:
        _TRUSTED.pop()


def _params(*vals):
    return mx.array(list(vals), dtype=mx.int32)


def bits_of(table: mx.array) -> int:
    """b for a codebook of 2**b levels."""
    return int(table.shape[0]).bit_length() - 1


def _format(table: mx.array, fmt):
    """(code bits, trellis window bits or 0): `fmt`, or a Lloyd-Max codebook's (bits_of(table), 0)."""
    return (bits_of(table), 0) if fmt is None else tuple(fmt)


def heads_per_group(G: int) -> int:
    """Query heads per tq_decode threadgroup: 1, 2 or 4 (registers hold 8 dims x this many heads)."""
    return 1 if G == 1 else 2 if G == 2 else 4


def num_blocks(T: int, n_groups: int, block=None):
    """(keys per block, blocks) for T coded tokens and n_groups = B * H * head groups threadgroup rows:
    split whenever there are fewer than 4 threadgroups per GPU core, with at least MIN_BLOCK keys per block.
    block (tests) imposes the keys per block."""
    if block is None:
        want = -(-4 * GPU_CORES // max(n_groups, 1))
        nb = max(1, min(want, T // MIN_BLOCK))
        block = -(-T // nb)
    block = max(1, int(block))
    return block, -(-T // block)


def _encode_rows(name, x, consts, bits, rot, norm_dtype, norm_correction, threadgroup, template=()):
    """A tq_encode-like launch: inputs [x rows, *consts, params [L, CH]], one row per threadgroup row ->
    (codes (B, H, L, W) uint32, norm (B, H, L) norm_dtype).  consts[0] (the mean) has CH rows: H, or B*H when
    batch row b has constants of its own (rows b*H .. b*H + H - 1)."""
    B, H, L, D = x.shape
    rows, words = B * H * L, -(-D * bits // 32)
    codes, norm = kernel(name)(
        inputs=[x.reshape(rows, D), *consts, _params(L, consts[0].shape[0])],
        template=[
            ("XT", x.dtype),
            ("NT", norm_dtype),
            ("D", D),
            ("BITS", bits),
            ("ROT", rot),
            ("NC", int(bool(norm_correction))),
            *template,
        ],
        grid=(threadgroup[0], rows, 1),
        threadgroup=threadgroup,
        output_shapes=[(rows, words), (rows,)],
        output_dtypes=[mx.uint32, norm_dtype],
    )
    return codes.reshape(B, H, L, words), norm.reshape(B, H, L)


def encode(x, mean, tmap, levels, edges, norm_dtype=mx.float16, norm_correction=True, rows_per_tg=4):
    """tq_encode: x (B, H, L, D) raw -> (codes (B, H, L, W) uint32, norm (B, H, L) norm_dtype).

    mean (H, D) f32; tmap (H, D) vector (Hadamard D) or (H, D, D) matrix: y = T(x - mean).  With (B*H, D)
    and (B*H, D(, D)) constants, batch row b uses rows b*H .. b*H + H - 1 (codecs of its own)."""
    consts = [mean, tmap, levels, edges]
    rot, tg = int(tmap.ndim == 3), (32, rows_per_tg, 1)
    return _encode_rows(
        "tq_encode", x, consts, bits_of(levels), rot, norm_dtype, norm_correction, tg, [("RPT", rows_per_tg)]
    )


def viterbi_supports(D: int) -> str | None:
    """None when tq_viterbi codes vectors of D coordinates, else why not."""
    if not 2 <= D <= VITERBI_D or D % 2:
        return f"tq_viterbi codes even D from 2 to {VITERBI_D} (its back pointers fill threadgroup memory), got {D}"
    return None


def viterbi_encode(x, mean, tmap, table, bits: int, norm_dtype=mx.float16, norm_correction=True):
    """tq_viterbi: x (B, H, L, D) raw -> (codes (B, H, L, W) uint32, norm (B, H, L) norm_dtype), the trellis
    codes of TrellisSegment.encode.  mean (H, D) f32; tmap (H, D) vector (Hadamard D) or (H, D, D) matrix, as
    for `encode`; tmap None: x holds the coordinates z themselves (trellis.search's input: no centring,
    rotation or scaling; for tests).  table: trellis.table(bits).  Raises ValueError for an unsupported D or table."""
    D = x.shape[-1]
    why = viterbi_supports(D)
    if why:
        raise ValueError(why)
    if table.shape != (1 << (bits + 6),):
        raise ValueError(f"a trellis table of 2**(bits + 6) = {1 << (bits + 6)} entries expected, got {table.shape}")
    rot = 2 if tmap is None else int(tmap.ndim == 3)
    if tmap is None:
        mean, tmap = mx.zeros((1, D)), mx.ones((1, D))
    return _encode_rows("tq_viterbi", x, [mean, tmap, table], bits, rot, norm_dtype, norm_correction, (64, 1, 1))


ROPE_TILE = 16  # tq_rope_bias's blocks per threadgroup (TQ_ROPE_TILE)


def rope_bias(q, scale, ra, rp, rang, b0: int, nb: int, block: int, G: int, front: bool = False):
    """tq_rope_bias: q (B, H*G, 1, D) raw; ra (CH, NP, 2), rp int32 (NP, 2), rang (NP,): the key mean in pairs
    (rope_mean.kernel_pairs); the term of blocks b0 .. b0 + nb - 1 of `block` positions, after blocks
    0 .. ROPE_TILE - 1 when `front` (a ring that keeps its first tokens): f (B*H*G, nb (+ ROPE_TILE) + 1) float32, the
    last column not written (tq_decode's last step may read it for keys past the end, whose scores it drops)."""
    B, D = q.shape[0], q.shape[-1]
    H = q.shape[1] // G
    nb += ROPE_TILE * front
    (f,) = kernel("tq_rope_bias")(
        inputs=[q, float(scale), ra, rp, rang, _params(b0, nb, int(front))],
        template=[("QT", q.dtype), ("D", D), ("G", G), ("NP", rp.shape[0]), ("RB", block)],
        grid=(256, B * H, -(-nb // 16)),
        threadgroup=(256, 1, 1),
        output_shapes=[(B * H * G, nb + 1)],
        output_dtypes=[mx.float32],
    )
    return f


def decode_partials(
    q,
    scale,
    qmap,
    kmr,
    kc,
    kn,
    vc,
    vn,
    kcb,
    vcb,
    sk,
    sv,
    wk,
    wv,
    ek,
    ev,
    lens,
    T,
    G,
    block=None,
    kfmt=None,
    vfmt=None,
    rope=None,
):
    """tq_decode.  q (B, H*G, 1, D) raw; the code buffers hold at most T tokens per batch row (full capacity,
    (B, H, cap, ...)); sk/sv (B, H, SC, D) and wk/wv (B, H, RC, D) fp16 sink and window tokens, ek/ev
    (B, H, EC, D) exact tokens; lens int32 (B or 1, 4): each row's [coded, sink, window, exact] counts.
    qmap, kmr: (H or B*H, D(, D)) constants (see tq_decode.metal); kfmt / vfmt: (code bits, trellis window
    bits) when kcb / vcb are trellis tables.  rope (RoPE-centred keys): (kf, block, fb0, kring, front), kf
    (B*H*G, NF) the turned mean's term per block of `block` positions (rope_bias) from block fb0 on (after
    a front tile if `front`), kring (B or 1, 4) int32 each row's ring layout (`RingSlots.offsets`, a numpy array
    or an array; None: slot t is at position (sinks) + t).
    Returns po (B*H*G, NB+1, D), pm, pl (B*H*G, NB+1) float32."""
    (kb, kl), (vb, vl) = _format(kcb, kfmt), _format(vcb, vfmt)
    B, H = kn.shape[:2]
    D = q.shape[-1]
    GH = heads_per_group(G)
    HG = -(-G // GH)
    blk, nb = num_blocks(T, B * H * HG, block)
    rows = B * H * G
    kf, rope_block, fb0, kring, front = rope or (None, 0, 0, None, False)
    return kernel("tq_decode")(
        inputs=[q, float(scale), qmap, kmr, kc, kn, vc, vn, kcb, vcb, sk, sv, wk, wv, ek, ev, lens]
        + [
            _no_bias() if kf is None else kf,
            _no_ring() if kring is None else mx.array(kring, mx.int32),
            _params(blk, fb0, int(front)),
        ],
        template=[
            ("QT", q.dtype),
            ("NT", kn.dtype),
            ("D", D),
            ("KB", kb),
            ("VB", vb),
            ("KL", kl),
            ("VL", vl),
            ("G", G),
            ("GH", GH),
            ("ROT", int(qmap.ndim == 3)),
            ("RB", int(rope_block) if kf is not None else 0),
            ("RPOS", int(kf is not None and kring is not None)),
        ],
        grid=(32 * NSG, B * H * HG, nb + 1),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=[(rows, nb + 1, D), (rows, nb + 1), (rows, nb + 1)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )


def _no_bias() -> mx.array:
    """The placeholder kf input of tq_decode without RoPE-centred keys, made once."""
    z = _NO_SINKS.get("kf")
    if z is None:
        z = _NO_SINKS["kf"] = mx.zeros((1, 1))
        mx.eval(z)
    return z


def _no_ring() -> mx.array:
    """The placeholder kring input of tq_decode (code slots in position order), made once."""
    z = _NO_SINKS.get("kring")
    if z is None:
        z = _NO_SINKS["kring"] = mx.zeros((1, 4), mx.int32)
        mx.eval(z)
    return z


def merge(po, pm, pl, vmr, omap, sinks, G, out_dtype):
    """tq_merge: the partials -> normalised output rows (B*H*G, D) in out_dtype, original domain.
    vmr, omap: (H or B*H, D(, D)) constants (see tq_merge.metal)."""
    rows, _, D = po.shape
    has = sinks is not None
    if not has:
        sinks = _NO_SINKS.get("x")
        if sinks is None:
            sinks = _NO_SINKS["x"] = mx.zeros((1,))
            mx.eval(sinks)
    return kernel("tq_merge")(
        inputs=[po, pm, pl, vmr, omap, sinks.astype(mx.float32), _params(int(has))],
        template=[("OT", out_dtype), ("D", D), ("G", G), ("ROT", int(omap.ndim == 3))],
        grid=(D, rows, 1),
        threadgroup=(D, 1, 1),
        output_shapes=[(rows, D)],
        output_dtypes=[out_dtype],
    )[0]


def dequantize(codes, norm, cb, T: int, D: int, out_dtype=mx.float16, rows_per_tg: int = 8, fmt=None):
    """tq_dequant: codes (B, H, cap, W) + norms (B, H, cap) -> n * c[idx] (B, H, T, D) in out_dtype;
    fmt: (code bits, trellis window bits) when cb is a trellis table."""
    B, H = norm.shape[:2]
    bits, window = _format(cb, fmt)
    nc = D // 8
    (y,) = kernel("tq_dequant")(
        inputs=[codes, norm, cb, _params(T)],
        template=[("NT", norm.dtype), ("OT", out_dtype), ("D", D), ("BITS", bits), ("TL", window)],
        grid=(nc, B * H * T, 1),
        threadgroup=(nc, rows_per_tg, 1),
        output_shapes=[(B, H, T, D)],
        output_dtypes=[out_dtype],
    )
    return y
