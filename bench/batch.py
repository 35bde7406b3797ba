"""Batched decode: throughput and memory for B concurrent sequences, TurboQuant batch caches vs mlx-lm's.

For each cache and context, one sequence's cache is filled directly with random K/V of the context length
(`speed.fill`, calibrated as a model would) and merged B times into a batch cache (mlx-lm's `merge`:
`BatchKVCache` for "fp", `BatchTurboQuantKVCache` for a preset); the real model then decodes `steps`
batched tokens (after one warm-up).  Throughput = B tokens per step / seconds per step; KV MiB = the batch
cache's nbytes; peak MiB = peak memory over the decode steps (model weights, the batch cache, the one
filled sequence kept to merge from and the temporaries).
"""

import mlx.core as mx
from mlx.utils import tree_flatten

import tq_mlx

from . import quality, report, speed


def merged(cache, B: int):
    """The per-layer caches of one sequence merged B times into batch caches (as mlx-lm's BatchGenerator)."""
    return [type(c).merge([c] * B) for c in cache]


def decode(model, single, B: int, steps: int):
    """(s per batched step, KV bytes, peak bytes) of the model decoding on `single` merged B times."""
    batch = merged(single, B)
    mx.eval([c.state for c in batch])
    tok = mx.ones((B, 1), mx.int32)
    mx.clear_cache()
    mx.reset_peak_memory()

    def step():
        mx.eval(model(tok, cache=batch))

    ms = speed._ms(step, steps)
    return {"step_ms": ms, "kv_bytes": tq_mlx.cache_nbytes(batch), "peak_mb": mx.get_peak_memory() / 2**20}


def main(args, base, presets, argv):
    from tqdm import tqdm

    from tq_mlx.models import load

    model, _ = load(args.model)
    dtype = tree_flatten(model.parameters())[0][1].dtype
    h, d = quality.kv_dims(model)
    contexts = [speed._n(x) for x in args.contexts.split(",") if x.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    names = ["fp"] + [p for p in presets if p != "fp"]
    ctx = report.context(
        args.model,
        argv,
        contexts=contexts,
        batches=batches,
        steps=args.steps,
        fill="one sequence filled directly with random K/V of the context length, merged B times",
        model_dtype=str(dtype),
        seed=args.seed,
    )
    res = report.Results(f"{base}.json", ctx, resume=args.resume)
    jobs = [(n, name) for n in contexts for name in names]
    try:
        for n, name in tqdm(jobs, desc="batch", disable=args.no_progress):
            if all(res.done(f"{name}@{n}x{B}") for B in batches):
                continue
            single = speed.fill(quality.make_cache(model, name), n - args.steps - 1, h, d, dtype)
            for B in batches:
                key = f"{name}@{n}x{B}"
                if res.done(key):
                    continue
                rec = {"name": name, "context": n, "batch": B}
                try:
                    rec.update(decode(model, single, B, args.steps))
                    rec["tok_s"] = B / (rec["step_ms"] / 1000)
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {e}"[:300]
                res.add(key, rec)
            del single
    finally:
        files = write(res, base, names, ctx)
    return files


def rows(entries):
    """Entries with ratios against fp at the same context and batch size."""
    out = []
    for r in entries.values():
        fp = entries.get(f"fp@{r['context']}x{r['batch']}", {})
        r = dict(r)
        if r.get("kv_bytes"):
            r["kv_mb"] = r["kv_bytes"] / 2**20
        for k, rk in (("tok_s", "tok_s_x"), ("kv_bytes", "kv_x")):
            if r.get(k) and fp.get(k):
                r[rk] = r[k] / fp[k]
        out.append(r)
    return out


def write(res, base, names, ctx):
    rs = rows(res.entries)
    rs.sort(key=lambda r: (r["context"], r["batch"], names.index(r["name"]) if r["name"] in names else 99))
    cols = ["name", "context", "batch", "step_ms", "tok_s", "tok_s_x", "kv_mb", "kv_x", "peak_mb", "error"]
    heads = ["cache", "context", "sequences", "ms/step", "tokens/s", "x fp", "KV MiB", "KV x fp", "peak MiB", "error"]
    keep = [i for i, c in enumerate(cols) if i == 0 or any(r.get(c) is not None for r in rs)]
    md = report.write_md(
        f"{base}.md",
        f"Batched decode: {ctx.get('model')}",
        ctx,
        [
            (
                "B sequences decoding together on batch caches (mlx-lm's merge); tokens/s over all sequences; "
                f"ratios vs mlx-lm's fp BatchKVCache (model dtype {ctx.get('model_dtype')})",
                report.md_table(rs, [cols[i] for i in keep], [heads[i] for i in keep]),
            )
        ],
    )
    plt = report.plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, (k, t) in zip(axes[0], (("tok_s", "decode throughput, tokens/s"), ("kv_mb", "KV cache, MiB"))):
        for i, name in enumerate(names):  # a colour per cache, a line style per context
            for j, n in enumerate(sorted({r["context"] for r in rs})):
                p = [(r["batch"], r[k]) for r in rs if r["name"] == name and r["context"] == n and r.get(k)]
                if p:
                    ax.plot(*zip(*p), marker=".", color=f"C{i}", ls=["-", "--", ":"][j % 3], label=f"{name} @{n}")
        ax.set_xlabel("concurrent sequences")
        ax.set_yscale("log")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"Batched decode on {ctx.get('backend')}: {ctx.get('model')}")
    png = report.save_fig(fig, f"{base}.png", ctx)
    return [res.path, md, png]
