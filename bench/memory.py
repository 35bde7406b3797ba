"""A model of KV cache bytes per token and total size, checked against nbytes of real caches.

Layers come from the model's own cache list (full `KVCache` or sliding
`RotatingKVCache(window)`) or from a config.json (layer_types or
sliding_window_pattern).  Per-token bytes of a codec are the bytes its own
`encode` returns for one token; per-layer constants (rotations, QJL matrices,
HQMQ tables, outlier permutations) are added once per layer.  Sliding layers
hold min(context, window) tokens; boundary layers keep the fp cache.
Allocated sizes round the code store (and the exact store before calibration) up to their growth step
(tq_mlx.store.STEP) for a one-shot fill; the fp16 sink and window stores are exactly sized.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache

import tq_mlx
from tq_mlx import rope_mean
from tq_mlx.calibration import QueryStats
from tq_mlx.codec_factory import Calibration, build_codec
from tq_mlx.store import STEP

from . import quality, report

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def layers_from_config(cfg: dict):
    """[(window or None), ...] per layer, and (n_kv_heads, head_dim) from a HF-style config dict."""
    cfg = cfg.get("text_config", cfg)
    n = cfg["num_hidden_layers"]
    h = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    win = cfg.get("sliding_window")
    if cfg.get("layer_types"):
        kinds = [win if t == "sliding_attention" else None for t in cfg["layer_types"]]
    elif cfg.get("sliding_window_pattern") and win:
        p = cfg["sliding_window_pattern"]
        kinds = [None if (i + 1) % p == 0 else win for i in range(n)]
    else:
        kinds = [None] * n
    return kinds, (int(h), int(d))


def layers_from_model(model):
    kinds = [c.max_size if type(c) is mlx_cache.RotatingKVCache else None for c in mlx_cache.make_prompt_cache(model)]
    return kinds, quality.kv_dims(model)


def _ceil(n, step):
    return -(-n // step) * step


def codec_cost(spec, cfg, h, d, layer, part):
    """Bytes per token over all heads of one codec: what its `encode` returns for one token."""
    x = mx.random.normal((1, h, 32, d))
    queries = QueryStats.of(mx.random.normal((1, h, 1, d)), spec.query_weighting == "full")
    codec = build_codec(spec, cfg, d, h, layer, part, Calibration(x, queries))
    return sum(a.nbytes for a in codec.encode(x[:, :, :1]).values())


def stand_in_rope(cfg, d):
    """A RoPE map for the model's caches when the config centres keys before RoPE (every kXvY preset): a plain
    RoPE over all d dims, whose map holds as many bytes as any RoPE of mlx-lm's on all dims; else None."""
    if cfg.keys.codec != "turboquant" or cfg.keys.center != "rope":
        return None
    return rope_mean.probe(nn.RoPE(d), d)


def layer_constant(cfg, layer, h, d, window=None):
    """(per-layer constant bytes (rotations, QJL matrices, HQMQ tables, learnt calibration) as the cache counts
    them: nbytes of a calibrated cache minus its token stores; the constants it shares with other layers (a RoPE
    map and its tables, counted once per model) as ((id, bytes), ...) before and after calibrating)."""
    c = tq_mlx.TurboQuantKVCache(cfg, layer, max_size=window, rope=stand_in_rope(cfg, d))
    before = _ids(c.shared_constants())
    x = mx.random.normal((1, h, max(1 + cfg.fp_sink + cfg.fp_window, cfg.quant_start), d))
    c.update_and_fetch(x, x)
    quality.settle(c)
    const = c.nbytes - sum(st.nbytes for st in (c.exact, c.sink, c.codes, c.window))
    return const, (before, _ids(c.shared_constants()))


def _ids(arrays) -> tuple:
    return tuple(sorted({id(a): a.nbytes for a in arrays}.items()))


@dataclass(frozen=True)
class Layer:
    """One layer of the memory model: bytes per token as stored, constants, and what stays uncompressed."""

    kind: str  # "fp", "affine" or "tq"
    tok: int  # bytes per token as stored (codes + norms, or fp)
    const: int = 0  # per-layer constants
    window: int = None  # sliding window size, or None
    sink: int = 0  # fp16 sink tokens (tq, full-attention layers)
    recent: int = 0  # fp16 recent-window tokens (tq)
    fp16_tok: int = 0  # bytes per token at fp16 (sinks, window)
    quant_start: int = 0  # tokens kept as given until this many are held (tq)
    exact_tok: int = 0  # bytes per token as given (the model's dtype)
    shared: tuple = ((), ())  # constants shared with other layers, ((id, bytes), ...) before and after calibrating


def shared_bytes(layers, context: int = None) -> int:
    """Bytes of the constants the layers share at `context` tokens (None: calibrated), each once."""

    def phase(ly):
        n = context if context is None or ly.window is None else min(context, ly.window)
        return ly.shared[0] if n is not None and n < max(ly.quant_start, 1) else ly.shared[1]

    return sum(dict(p for ly in layers for p in phase(ly)).values())


def layer_model(name, kinds, h, d, fp_bytes=2, boundary=0):
    """Per layer: a Layer."""
    n = len(kinds)
    out = []
    fp_tok = h * 2 * d * fp_bytes
    if name == "fp" or name in quality.AFFINE:
        for w in kinds:
            if name != "fp" and w is None:
                b = quality.AFFINE[name]
                tok = 2 * h * (4 * math.ceil(d * b / 32) + 2 * (d // 64) * fp_bytes)
                out.append(Layer("affine", tok, window=w))
            else:
                out.append(Layer("fp", fp_tok, window=w))
        return out
    cfg = tq_mlx.resolve_config(name, boundary_layers=boundary) if boundary else tq_mlx.resolve_config(name)
    nb = cfg.boundary_layers
    for i, w in enumerate(kinds):
        if i < nb or i >= n - nb or (w is not None and not cfg.quantize_sliding):
            out.append(Layer("fp", fp_tok, window=w))
            continue
        tok = codec_cost(cfg.keys, cfg, h, d, i, "k") + codec_cost(cfg.values, cfg, h, d, i, "v")
        probe = tq_mlx.TurboQuantKVCache(cfg, i, max_size=w)
        const, shared = layer_constant(cfg, i, h, d, w)
        out.append(
            Layer(
                "tq",
                tok,
                const,
                w,
                cfg.fp_sink if w is None else 0,
                probe.window_size,
                2 * h * 2 * d,
                probe._quant_start,
                fp_tok,
                shared,
            )
        )
    return out


def total_bytes(layers, context: int, allocated: bool = True) -> int:
    """Cache bytes at `context` tokens (each layer filled in one update; sliding layers hold their window).

    allocated: round tq-mlx's token stores up to STEP tokens and mlx-lm's caches up to their 256
    (the sink and window stores are exact; mlx-lm's RotatingKVCache concatenates: no slack)."""
    tot = shared_bytes(layers, context)
    for ly in layers:
        n = context if ly.window is None else min(context, ly.window)
        step = STEP if ly.kind == "tq" else mlx_cache.KVCache.step

        def up(m, step=step):
            return _ceil(m, step) if allocated else m

        if ly.kind != "tq":
            tot += (n if ly.kind == "fp" and ly.window is not None else up(n)) * ly.tok
        elif n < max(ly.quant_start, 1):  # the exact phase: nothing compressed, no codecs yet
            tot += up(n) * ly.exact_tok
        else:
            s = min(ly.sink, n)
            r = min(ly.recent, n - s)
            tot += up(n - s - r) * ly.tok + (s + r) * ly.fp16_tok + ly.const
    return tot


def measure(model, name, kinds, h, d, context, dtype, boundary=0):
    """nbytes of a real cache list, each layer filled directly with random K/V of its held length."""
    if model is not None:
        cache = quality.make_cache(model, name, **({"boundary_layers": boundary} if boundary else {}))
    else:
        cfg = tq_mlx.resolve_config(name, boundary_layers=boundary) if name not in quality.BASELINES else None
        cache = []
        for i, w in enumerate(kinds):
            fp = cfg is None or i < cfg.boundary_layers or i >= len(kinds) - cfg.boundary_layers
            if name in quality.AFFINE and w is None:
                cache.append(mlx_cache.QuantizedKVCache(64, quality.AFFINE[name]))
            elif fp or name in quality.BASELINES:
                cache.append(mlx_cache.KVCache() if w is None else mlx_cache.RotatingKVCache(w, keep=0))
            else:
                cache.append(tq_mlx.TurboQuantKVCache(cfg, i, max_size=w, rope=stand_in_rope(cfg, d)))
    total = 0
    for c, w in zip(cache, kinds):
        n = context if w is None else min(context, w)
        x = mx.random.normal((1, h, n, d)).astype(dtype)
        c.update_and_fetch(x, x)
        quality.settle(c)
        total += c.nbytes
    return total + tq_mlx.cache_nbytes(cache) - sum(c.nbytes for c in cache)  # + constants layers share


def main(args, base, presets, argv):
    from tqdm import tqdm

    dtype = DTYPES[args.fp_dtype]
    fp_bytes = dtype.size
    model = None
    if str(args.model).endswith(".json"):
        kinds, (h, d) = layers_from_config(json.loads(Path(args.model).read_text()))
    else:
        from tq_mlx.models import load

        model, _ = load(args.model)
        kinds, (h, d) = layers_from_model(model)
    contexts = [int(c[:-1]) * 1024 if c.lower().endswith("k") else int(c) for c in args.contexts.split(",")]
    ctx = report.context(
        args.model,
        argv,
        layers=len(kinds),
        kv_heads=h,
        head_dim=d,
        sliding=[w for w in kinds],
        fp_dtype=args.fp_dtype,
        boundary_layers=args.boundary_layers,
        check_context=args.check_context,
        seed=args.seed,
    )
    res = report.Results(f"{base}.json", ctx, resume=args.resume)
    names = ["fp", "affine8", "affine4"] + presets
    fp_total = {c: total_bytes(layer_model("fp", kinds, h, d, fp_bytes), c, allocated=False) for c in contexts}
    try:
        for name in tqdm(names, desc="memory", disable=args.no_progress):
            if res.done(name):
                continue
            rec = {"name": name}
            try:
                lm = layer_model(name, kinds, h, d, fp_bytes, args.boundary_layers)
                q = [ly for ly in lm if ly.kind != "fp"] or lm
                rec["bytes_per_token_layer"] = sum(ly.tok for ly in q) / len(q)
                rec["bpe"] = 8 * rec["bytes_per_token_layer"] / (h * 2 * d)
                rec["const_bytes"] = sum(ly.const for ly in lm) + shared_bytes(lm)
                rec["total"] = {str(c): total_bytes(lm, c, allocated=False) for c in contexts}
                rec["ratio_vs_fp"] = {str(c): fp_total[c] / rec["total"][str(c)] for c in contexts}
                rec["model_allocated"] = total_bytes(lm, args.check_context)
                try:
                    rec["measured"] = measure(model, name, kinds, h, d, args.check_context, dtype, args.boundary_layers)
                    rec["match"] = rec["measured"] == rec["model_allocated"]
                except Exception as e:
                    rec["measure_error"] = f"{type(e).__name__}: {e}"[:300]
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
            res.add(name, rec)
    finally:
        files = write(res, base, contexts, ctx)
    return files


def _mb(b):
    return None if b is None else b / 2**20


def write(res, base, contexts, ctx):
    rows = []
    for r in res.entries.values():
        row = {
            "name": r["name"],
            "bpe": r.get("bpe"),
            "const_kb": (r.get("const_bytes") or 0) / 1024,
            "check": ("ok" if r.get("match") else "MISMATCH")
            if "match" in r
            else r.get("measure_error", r.get("error")),
            "model_mb": _mb(r.get("model_allocated")),
            "measured_mb": _mb(r.get("measured")),
        }
        for c in contexts:
            row[f"mb{c}"] = _mb(r.get("total", {}).get(str(c)))
            row[f"x{c}"] = r.get("ratio_vs_fp", {}).get(str(c))
        rows.append(row)
    cols = ["name", "bpe", "const_kb"] + [f"mb{c}" for c in contexts] + [f"x{contexts[-1]}"]
    heads = (
        ["cache", "bits/elem (quantized layers)", "constants KiB"]
        + [f"MiB @ {c}" for c in contexts]
        + [f"vs fp @ {contexts[-1]}"]
    )
    chk = report.md_table(
        rows,
        ["name", "model_mb", "measured_mb", "check"],
        ["cache", f"model MiB @ {ctx.get('check_context', '')}", "measured nbytes MiB", "check"],
    )
    md = report.write_md(
        f"{base}.md",
        f"KV memory: {ctx.get('model')}",
        ctx,
        [
            (f"Modelled cache size (fp layers at {ctx['fp_dtype']})", report.md_table(rows, cols, heads)),
            (f"Model vs measured nbytes (allocated, {STEP}-token steps)", chk),
        ],
    )
    plt = report.plt()
    fig, ax = plt.subplots(figsize=(8.5, 5))
    n_base = n_tq = 0
    for r in res.entries.values():
        if "total" in r:
            is_base = r["name"] in quality.BASELINES
            kw = report.style(n_base if is_base else n_tq, is_base)
            n_base, n_tq = n_base + is_base, n_tq + (not is_base)
            ax.plot(contexts, [r["total"][str(c)] / 2**20 for c in contexts], label=r["name"], ms=4, **kw)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache MiB (whole model)")
    ax.set_title(f"KV cache size: {ctx.get('model')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    png = report.save_fig(fig, f"{base}.png", ctx)
    return [res.path, md, png]
