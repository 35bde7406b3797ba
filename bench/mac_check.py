"""tq-bench mac-check: what the first Mac user runs, and pastes into bench/RESULTS.md.

1. Builds every kernel instantiation (head dims 64/80/96/128/256, code widths 1-8, 1-8 query heads
   per KV head, an exactly-sized tiny cache and a large one) and checks each against the reference
   path on random data: two decode steps and a prefill chunk.
2. Times decode attention per layer against fp16 mx.fast.scaled_dot_product_attention and mlx-lm's
   quantized SDPA (4 and 8 bits) at 1K..64K tokens.
3. Writes JSON, markdown and a PNG with the chip's name.

Without Metal it runs step 1 on the CPU emulator (tools/metal_emu in a checkout) for a representative
subset at small sizes (--full for all), and says plainly that timings need a Mac.
"""

import contextlib
import itertools
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import kernels as kbench
from . import report

DIMS = (64, 80, 96, 128, 256)


def _emulator():
    """metal_emu's patched_mlx from the checkout, or an error saying where it lives."""
    tools = Path(__file__).resolve().parents[1] / "tools" / "metal_emu"
    if not (tools / "metal_emu").is_dir():
        raise SystemExit(
            "No Metal back-end, and the Metal emulator (tools/metal_emu) ships with the repository, "
            "not the wheel: run `tq-bench mac-check` from a checkout, or on a Mac."
        )
    sys.path.insert(0, str(tools))
    from metal_emu.mlx_patch import patched_mlx

    return patched_mlx


def instantiations(full: bool, metal: bool, dims=DIMS):
    """(D, K bits, V bits, G, tokens, tiny, keys) to check; keys "static": centred after RoPE (the -static presets,
    and layers whose RoPE tq-mlx cannot read), "rope": before it (the presets' default: tq_rope_bias runs too),
    "ring": before it, in a sliding window's wrapped ring (tq_decode computes each slot's position)."""
    yield from (i for i in _instantiations(full, metal) if i[0] in dims)


def _instantiations(full, metal):
    if full or metal:
        bits = [(b, b) for b in range(1, 9)] + [(4, 3), (8, 4), (4, 2), (3, 2)]
        heads = range(1, 9)
        big = 3000 if metal else 300
        for D, (kb, vb), G, keys in itertools.product(DIMS, bits, heads, ("rope", "static")):
            yield D, kb, vb, G, big, False, keys
        for D, G in itertools.product(DIMS, (1, 4, 8)):
            yield D, 4, 4, G, big, False, "ring"
        for D in DIMS:
            yield D, 4, 4, 4, 4, True, "rope"
        return
    for D in DIMS:
        for G in (1, 4, 7):
            yield D, 4, 3, G, 150, False, "rope"
        yield D, 4, 4, 4, 150, False, "static"
        yield D, 4, 4, 4, 150, False, "ring"
        yield D, 4, 4, 4, 4, True, "rope"
    for kb, vb in ((1, 1), (2, 2), (3, 3), (5, 5), (6, 6), (7, 7), (8, 8)):
        yield 128, kb, vb, 4, 150, False, "rope"


def check(D, kb, vb, G, T, tiny, keys="rope", seed=0):
    """Max error of the kernel path against the reference path (relative to the output scale), or raises."""
    import tq_mlx
    from tq_mlx.attention import attention
    from tq_mlx.reference_attention import reference_attention

    from .memory import stand_in_rope

    H = 2
    cfg = tq_mlx.resolve_config(f"k{kb}v{vb}{'-static' if keys == 'static' else ''}", quant_start=0, fp_window=2)
    os.environ["TQ_MLX_ATTENTION"] = "reference"
    ring = dict(max_size=T // 2, keep=4) if keys == "ring" else {}  # decode steps then wrap it
    cache = tq_mlx.TurboQuantKVCache(cfg, rope=stand_in_rope(cfg, D), **ring)
    k = mx.random.normal((1, H, T, D), key=mx.random.key(seed))
    cache.update_and_fetch(k, k * 0.5)
    attention(cache, mx.random.normal((1, H * G, T, D), key=mx.random.key(seed + 1)), D**-0.5, "causal")
    if tiny:
        cache = tq_mlx.TurboQuantKVCache.from_state(cache.state)  # exactly-sized buffers
    for codec in (cache.k_codec, cache.v_codec):  # new tokens encode through tq_encode
        codec.kernel_encode = codec.kernel_encodes()
    err = 0.0
    for step in range(2):
        x = mx.random.normal((1, H, 1, D), key=mx.random.key(seed + 2 + step))
        cache.update_and_fetch(x, -x)
        q = mx.random.normal((1, H * G, 1, D), key=mx.random.key(seed + 5 + step))
        ref = np.array(reference_attention(cache, q, D**-0.5))
        os.environ["TQ_MLX_ATTENTION"] = "metal"
        got = np.array(attention(cache, q, D**-0.5))
        os.environ["TQ_MLX_ATTENTION"] = "reference"
        err = max(err, float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max())))
    if ring:
        return err
    x = mx.random.normal((1, H, 5, D), key=mx.random.key(seed + 9))
    cache.update_and_fetch(x, x)
    q = mx.random.normal((1, H * G, 5, D), key=mx.random.key(seed + 10))
    ref = np.array(reference_attention(cache, q, D**-0.5, "causal"))
    os.environ["TQ_MLX_ATTENTION"] = "metal"
    got = np.array(attention(cache, q, D**-0.5, "causal"))
    os.environ["TQ_MLX_ATTENTION"] = "reference"
    return max(err, float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max())))


def _chip() -> str:
    if not mx.metal.is_available():
        return "no Metal back-end (CPU emulator)"
    try:
        return str(mx.metal.device_info().get("device_name", "Apple GPU"))
    except Exception:  # noqa: BLE001
        return "Apple GPU"


def main(args, base, argv):
    from tqdm import tqdm

    from tq_mlx import kernels

    metal = mx.metal.is_available()
    chip = _chip()
    ctx = report.context(None, argv, chip=chip, full=args.full)
    res = report.Results(f"{base}.json", ctx, resume=args.resume)
    if not metal:
        print(
            "No Metal back-end here: checking the kernels on the CPU emulator at small sizes. "
            "Timings need a Mac: none are measured."
        )
    patch = None if metal else _emulator()(check_races=False)
    todo = list(instantiations(args.full, metal, tuple(int(d) for d in args.dims.split(","))))
    tol = 2e-5
    with patch if patch is not None else contextlib.nullcontext():
        for D, kb, vb, G, T, tiny, keys in tqdm(todo, desc="instantiations", disable=args.no_progress):
            suffix = "" if keys == "rope" else f"-{keys}"
            key = f"D{D}-k{kb}v{vb}{suffix}-G{G}-T{T}{'-tiny' if tiny else ''}"
            if res.done(key):
                continue
            rec = {"D": D, "kb": kb, "vb": vb, "keys": keys, "G": G, "T": T, "tiny": tiny}
            kernels._VERIFIED.clear()
            try:
                t = time.perf_counter()
                rec["max_err"] = check(D, kb, vb, G, T, tiny, keys)
                rec["seconds"] = time.perf_counter() - t
                rec["ok"] = rec["max_err"] <= tol and not any(v is False for v in kernels._VERIFIED.values())
                if not rec["ok"] and rec["max_err"] <= tol:
                    rec["error"] = "a kernel failed to build or launch (the reference path answered)"
            except Exception as e:  # noqa: BLE001 - the report lists every failure
                rec["ok"], rec["error"] = False, f"{type(e).__name__}: {e}"[:300]
            res.add(key, rec)
    timings = []
    if metal:
        for T in [kbench._ctx_len(c) for c in args.contexts.split(",")]:
            for name, ms in kbench.measure(T, args.preset, 32, 8, 128, args.repeats).items():
                timings.append({"context": T, "method": name, "ms": ms})
        res.extra["timings"] = timings
        res.write()
    rows = list(res.entries.values())
    bad = [r for r in rows if not r.get("ok")]
    summary = (
        f"{len(rows) - len(bad)} of {len(rows)} instantiations agree with the reference path "
        f"(max error {max((r.get('max_err') or 0) for r in rows):.2g}, tolerance {tol:g}) on {chip}."
    )
    sections = [("Summary", summary + ("" if metal else " Timings need a Mac: none were measured here."))]
    if bad:
        cols = ["D", "kb", "vb", "keys", "G", "T", "tiny", "max_err", "error"]
        sections.append(("Failures", report.md_table(bad, cols)))
    cols = ["D", "kb", "vb", "keys", "G", "T", "tiny", "max_err", "ok"]
    sections.append(("Instantiations", report.md_table(rows, cols)))
    if timings:
        sections.append(
            (
                "Decode attention per layer on this Mac (ms; 32 q / 8 kv heads, d=128)",
                report.md_table(timings, ["context", "method", "ms"]),
            )
        )
    md = report.write_md(f"{base}.md", f"mac-check: {chip}", ctx, sections)
    plt = report.plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if timings:
        for m in dict.fromkeys(r["method"] for r in timings):
            pts = [(r["context"], r["ms"]) for r in timings if r["method"] == m]
            ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode attention per layer (ms)")
        ax.legend(fontsize=8)
    else:
        errs = [max(r.get("max_err") or 0, 1e-9) for r in rows]
        ax.bar(range(len(rows)), errs, color=["tab:green" if r.get("ok") else "tab:red" for r in rows])
        ax.axhline(tol, color="gray", linestyle="--", label=f"tolerance {tol:g}")
        ax.set_yscale("log")
        ax.set_xlabel("instantiation")
        ax.set_ylabel("max error vs reference")
        ax.legend(fontsize=8)
    ax.set_title(f"mac-check on {chip}", fontsize=9)
    png = report.save_fig(fig, f"{base}.png", ctx)
    print(summary)
    return [Path(f"{base}.json"), md, png]
