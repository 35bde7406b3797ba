"""Decode and prefill speed, peak memory and KV bytes for each cache and context.

Decode: the cache of every layer is filled directly with random K/V of the
context length (sliding layers: their window), then the real model decodes
`steps` tokens (after one warm-up); latency does not depend on the values.
Prefill: a real chunked prefill of random tokens, only up to --prefill-max.
Attention: one layer's decode attention alone (random q), since on a CPU the
model's matmuls dominate end-to-end decode.
"""

import time

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.base import quantized_scaled_dot_product_attention

import tq_mlx
from tq_mlx.attention import attention

from . import quality, report


def _ms(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return 1000 * ts[len(ts) // 2]


PIECE = 4096  # tokens per direct update: the settling attention call's scores stay under ~1 GB


def fill_layer(c, kv, hq=None):
    """Fill one layer's cache with kv (1, h, n, d) in pieces of PIECE tokens, each followed by an attention
    call (`quality.settle`), as a chunked prefill would."""
    for s in range(0, kv.shape[2], PIECE):
        c.update_and_fetch(kv[:, :, s : s + PIECE], kv[:, :, s : s + PIECE])
        quality.settle(c, hq)
        mx.eval(_arrays(c))
    return c


def fill(cache, n, h, d, dtype):
    """Fill every layer directly with random K/V: n tokens (sliding layers: min(n, window))."""
    for c in cache:
        m = n if getattr(c, "max_size", None) is None else min(n, c.max_size)
        fill_layer(c, mx.random.normal((1, h, m, d)).astype(dtype))
    return cache


def _arrays(c):
    if isinstance(c, tq_mlx.TurboQuantKVCache):
        return [a for st in (c.exact, c.sink, c.codes, c.window) for a in st.buffers.values()]
    st = c.state
    flat = []
    for x in st if isinstance(st, (list, tuple)) else [st]:
        flat += list(x) if isinstance(x, (list, tuple)) else [x]
    return [a for a in flat if isinstance(a, mx.array)]


def kv_bytes(cache) -> int:
    return tq_mlx.cache_nbytes(cache)


def decode(model, name, n, steps, dtype):
    """ms/token of the real model on a cache filled directly to n tokens; peak memory while decoding (weights,
    cache and the steps' temporaries, from the second step: not the fill, whose calibrating attention call only
    our caches make, nor the whole filled context the first update hands back); KV bytes."""
    h, d = quality.kv_dims(model)
    cache = fill(quality.make_cache(model, name), max(n - steps - 2, 1), h, d, dtype)  # ends at n
    tok = mx.array([[1]])

    def step():
        mx.eval(model(tok, cache=cache))

    step()
    mx.clear_cache()
    mx.reset_peak_memory()
    ms = _ms(step, steps)
    return {"decode_ms": ms, "kv_bytes": kv_bytes(cache), "peak_mb": mx.get_peak_memory() / 2**20}


def prefill(model, name, n, chunk=512):
    """Tokens/s of a real chunked prefill of n random tokens."""
    cache = quality.make_cache(model, name)
    toks = mx.random.randint(0, model.args.vocab_size, (1, n))
    t = time.perf_counter()
    for s in range(0, n, chunk):
        mx.eval(model(toks[:, s : s + chunk], cache=cache))
    return n / (time.perf_counter() - t)


def attention_ms(name, n, hq, h, d, reps=5):
    """One layer's decode attention at n tokens, ms per call (random q and K/V, fp32)."""
    scale = d**-0.5
    q = mx.random.normal((1, hq, 1, d))
    kv = mx.random.normal((1, h, n, d))
    if name == "fp":

        def fn():
            return mx.eval(mx.fast.scaled_dot_product_attention(q, kv, kv, scale=scale))
    elif name in quality.AFFINE:
        b = quality.AFFINE[name]
        qk = mx.quantize(kv, group_size=64, bits=b)
        mx.eval(qk)

        def fn():
            return mx.eval(
                quantized_scaled_dot_product_attention(q, qk, qk, scale=scale, mask=None, group_size=64, bits=b)
            )
    else:
        c = fill_layer(tq_mlx.TurboQuantKVCache(name), kv, hq)

        def fn():
            return mx.eval(attention(c, q, scale, None))

    return _ms(fn, reps)


def main(args, base, presets, argv):
    from tqdm import tqdm

    from tq_mlx.models import load

    model, _ = load(args.model)
    dtype = tree_flatten(model.parameters())[0][1].dtype
    h, d = quality.kv_dims(model)
    hq = model.args.num_attention_heads
    contexts = [c for c in (_n(x) for x in args.contexts.split(",")) if c <= args.max_context]
    names = [b for b in args.baselines.split(",") if b] + presets
    ctx = report.context(
        args.model,
        argv,
        contexts=contexts,
        steps=args.steps,
        prefill_max=args.prefill_max,
        decode_fill="each layer filled directly with random K/V of the context length "
        "(sliding layers: their window); the model then decodes real steps",
        model_dtype=str(dtype),
        seed=args.seed,
    )
    res = report.Results(f"{base}.json", ctx, resume=args.resume)
    jobs = [(n, name) for n in contexts for name in names]
    try:
        for n, name in tqdm(jobs, desc="speed", disable=args.no_progress):
            key = f"{name}@{n}"
            if res.done(key):
                continue
            rec = {"name": name, "context": n}
            for what, fn in (
                ("attn_ms", None if args.no_attention else lambda name=name, n=n: attention_ms(name, n, hq, h, d)),
                ("decode", None if args.no_model else lambda name=name, n=n: decode(model, name, n, args.steps, dtype)),
                (
                    "prefill_tok_s",
                    lambda name=name, n=n: (
                        prefill(model, name, n) if not args.no_model and n <= args.prefill_max else None
                    ),
                ),
            ):
                if fn is None:
                    continue
                try:
                    v = fn()
                    if v is not None:
                        rec.update(v if isinstance(v, dict) else {what: v})
                except Exception as e:
                    rec.setdefault("error", f"{what}: {type(e).__name__}: {e}"[:300])
            res.add(key, rec)
    finally:
        files = write(res, base, contexts, names, ctx)
    return files


def _n(s):
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def ratios(entries):
    """Add ratios against fp at the same context."""
    rows = []
    for r in entries.values():
        fp = entries.get(f"fp@{r['context']}", {})
        r = dict(r)
        for k, rk in (
            ("decode_ms", "decode_x"),
            ("attn_ms", "attn_x"),
            ("kv_bytes", "kv_x"),
            ("prefill_tok_s", "prefill_x"),
        ):
            if r.get(k) and fp.get(k):
                r[rk] = r[k] / fp[k]
        if r.get("kv_bytes"):
            r["kv_mb"] = r["kv_bytes"] / 2**20
        rows.append(r)
    return rows


def write(res, base, contexts, names, ctx):
    rows = ratios(res.entries)
    cols = [
        "name",
        "context",
        "decode_ms",
        "decode_x",
        "attn_ms",
        "attn_x",
        "prefill_tok_s",
        "kv_mb",
        "kv_x",
        "peak_mb",
        "error",
    ]
    heads = [
        "cache",
        "context",
        "decode ms/tok",
        "x fp",
        "attn ms/layer",
        "x fp",
        "prefill tok/s",
        "KV MiB",
        "KV x fp",
        "peak MiB (decode)",
        "error",
    ]
    keep = [i for i, c in enumerate(cols) if i == 0 or any(r.get(c) is not None for r in rows)]
    cols, heads = [cols[i] for i in keep], [heads[i] for i in keep]  # drop columns not measured
    rows.sort(key=lambda r: (r["context"], names.index(r["name"]) if r["name"] in names else 99))
    md = report.write_md(
        f"{base}.md",
        f"Speed: {ctx.get('model')}",
        ctx,
        [
            (
                "Decode on a cache filled directly with random K/V; attention = one layer alone; "
                f"ratios vs the fp cache (model dtype {ctx.get('model_dtype')})",
                report.md_table(rows, cols, heads),
            )
        ],
    )
    plt = report.plt()
    panels = [
        (k, t)
        for k, t in (("decode_ms", "end-to-end decode, ms/token"), ("attn_ms", "decode attention, one layer, ms"))
        if any(r.get(k) for r in rows)
    ]
    panels = panels or [("decode_ms", "end-to-end decode, ms/token")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (k, t) in zip(axes[0], panels):
        for name in names:
            p = [(r["context"], r[k]) for r in rows if r["name"] == name and r.get(k)]
            if p:
                ax.plot(*zip(*p), marker=".", label=name, ls="--" if name in quality.BASELINES else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"Speed on {ctx.get('backend')}: {ctx.get('model')}")
    png = report.save_fig(fig, f"{base}.png", ctx)
    return [res.path, md, png]
