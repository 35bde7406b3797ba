"""Decode-attention speed per layer against context length: `python -m tq_mlx.bench.kernels`.

Times one layer's decode step (one query token, Llama-3.1-8B-like shapes by default:
32 query heads, 8 KV heads, head_dim 128) for
- fp16: mx.fast.scaled_dot_product_attention on float16 K/V;
- affine4 / affine8: mlx-lm's quantized_scaled_dot_product_attention (group size 64);
- TurboQuant presets: tq_mlx.attention.attention on a TurboQuantKVCache holding the
  context as codes (the Metal kernels on a Metal back-end, the reference path elsewhere).
For each it reports the bytes of KV read per step and the implied bandwidth; with a peak
bandwidth (--peak-gbps, or the chip table below on a Metal back-end) the implied fraction of it.

Without Metal it says so, times everything on the CPU (contexts capped by --max-context,
8K by default) and labels every figure with the back-end that produced it: no Metal
number is ever printed that was not measured.  Writes JSON (+ PNG with matplotlib).
"""

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx

PEAK_GBPS = {  # unified-memory bandwidth by chip name fragment (field notes, section 4)
    "M1 Ultra": 800,
    "M2 Ultra": 800,
    "M1 Max": 400,
    "M2 Max": 400,
    "M3 Max": 400,
    "M4 Max": 546,
    "M1 Pro": 200,
    "M2 Pro": 200,
    "M3 Pro": 150,
    "M4 Pro": 273,
    "M1": 68,
    "M2": 100,
    "M3": 100,
    "M4": 120,
    "M5": 153,
}


def _context():
    info = {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": "metal" if mx.metal.is_available() else "cpu",
    }
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except Exception:  # noqa: BLE001
        pass
    if info["backend"] == "metal":
        try:
            info["device"] = {
                k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in mx.metal.device_info().items()
            }
        except Exception:  # noqa: BLE001
            pass
    return info


def _peak(ctx, override):
    if override:
        return float(override)
    if ctx["backend"] != "metal":
        return None
    name = str(ctx.get("device", {}).get("device_name", ""))
    for frag in sorted(PEAK_GBPS, key=len, reverse=True):
        if frag in name:
            return float(PEAK_GBPS[frag])
    return None


def _time(fn, repeats, warmup=2):
    for _ in range(warmup):
        mx.eval(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def _nbytes(arrays):
    return int(sum(a.nbytes for a in arrays))


def bench_context(T, args):
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    import tq_mlx
    from tq_mlx.attention import attention

    from .quality import settle

    Hq, H, D = args.q_heads, args.kv_heads, args.head_dim
    scale = D**-0.5
    mx.random.seed(T)
    k = mx.random.normal((1, H, T, D)).astype(mx.float16)
    v = mx.random.normal((1, H, T, D)).astype(mx.float16)
    q = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
    mx.eval(k, v, q)
    rows = []

    def add(name, fn, nbytes):
        t = _time(fn, args.repeats)
        rows.append({"method": name, "context": T, "seconds": t, "kv_bytes": nbytes, "gbps": nbytes / t / 1e9})

    add("fp16", lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), _nbytes([k, v]))
    for bits in args.affine:
        qk, qv = mx.quantize(k, group_size=64, bits=bits), mx.quantize(v, group_size=64, bits=bits)
        mx.eval(qk, qv)
        add(
            f"affine{bits}",
            lambda qk=qk, qv=qv, bits=bits: quantized_scaled_dot_product_attention(q, qk, qv, scale, None, 64, bits),
            _nbytes([*qk, *qv]),
        )
        del qk, qv
    for preset in args.presets:
        cache = tq_mlx.TurboQuantKVCache(tq_mlx.resolve_config(preset, fp_window=0))
        for s in range(0, T, 4096):  # encode in chunks (bounded temporary memory), attention after each
            cache.update_and_fetch(k[:, :, s : s + 4096], v[:, :, s : s + 4096])
            settle(cache, Hq)

        def step(cache=cache):
            return attention(cache, q, scale)

        nbytes = _nbytes([a for b in cache.blocks() for a in (*b.k.values(), *b.v.values())])

        add(f"tq-{preset}", step, nbytes)
        del cache
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--min-context", type=int, default=1024)
    p.add_argument(
        "--max-context", type=int, default=None, help="largest context (default 131072 with Metal, 8192 without)"
    )
    p.add_argument("--presets", nargs="+", default=["k4v4", "k4v3", "k8v4"])
    p.add_argument("--affine", nargs="*", type=int, default=[4, 8])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth for the fraction column")
    p.add_argument("--out", default="bench/results/kernels.json")
    p.add_argument("--no-png", action="store_true")
    args = p.parse_args(argv)

    ctx = _context()
    metal = ctx["backend"] == "metal"
    if args.max_context is None:
        args.max_context = 131072 if metal else 8192
    if not metal:
        print(
            "No Metal back-end here: the Metal kernels cannot run. Timing the CPU implementations "
            "instead (TurboQuant through the reference path); these are CPU figures, not Metal ones."
        )
    peak = _peak(ctx, args.peak_gbps)
    contexts, T = [], args.min_context
    while T <= args.max_context:
        contexts.append(T)
        T *= 2
    rows = []
    print(f"{'method':>12} {'context':>8} {'ms/layer':>9} {'KV MB':>8} {'GB/s':>7}" + ("  of peak" if peak else ""))
    for T in contexts:
        for r in bench_context(T, args):
            r["backend"] = ctx["backend"]
            r["fraction_of_peak"] = r["gbps"] / peak if peak else None
            rows.append(r)
            frac = f"  {100 * r['fraction_of_peak']:6.1f}%" if peak else ""
            print(
                f"{r['method']:>12} {T:>8} {1e3 * r['seconds']:9.3f} {r['kv_bytes'] / 1e6:8.2f} {r['gbps']:7.2f}{frac}",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shapes = {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "batch": 1}
    tq_path = "metal kernels" if metal else "reference path (MLX ops on the CPU)"
    out.write_text(
        json.dumps(
            {"context": {**ctx, "peak_gbps": peak, "shapes": shapes, "tq_path": tq_path}, "results": rows}, indent=1
        )
    )
    print(f"wrote {out}")
    if not args.no_png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4.5))
            for m in dict.fromkeys(r["method"] for r in rows):
                pts = [(r["context"], 1e3 * r["seconds"]) for r in rows if r["method"] == m]
                ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("decode attention per layer (ms)")
            ax.set_title(
                f"{ctx['backend']} back-end ({'measured Metal' if metal else 'CPU only, no Metal'}), "
                f"Hq={args.q_heads} H={args.kv_heads} d={args.head_dim}",
                fontsize=9,
            )
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out.with_suffix(".png"), dpi=120)
            print(f"wrote {out.with_suffix('.png')}")
        except ImportError:
            print("matplotlib missing: no PNG")


if __name__ == "__main__":
    main()
