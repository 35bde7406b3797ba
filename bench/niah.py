"""Needle in a haystack: can the model read back a made-up pass-code from a compressed cache?

The filler is real text; the needle is a sentence with a random pass-code that
is asserted not to occur in the filler.  The prompt (filler with the needle at
a depth, then a cue) is prefilled in chunks into the cache, the answer is
decoded greedily and counted correct when it contains the code.
"""

import random

import mlx.core as mx

from . import quality, report, texts

NEEDLE = " The secret pass-code for the blue vault is {code}. Remember it: {code}."
CUE = (
    "\n\nQuestion: what is the secret pass-code for the blue vault?\nAnswer: The secret pass-code for the blue vault is"
)


def make_code(rng) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(5))


def build_prompt(tok, filler_ids, context, depth, code, bos=None):
    """Token ids of `context` length: filler with the needle inserted at `depth` (0..1), then the cue."""
    needle = list(tok.encode(NEEDLE.format(code=code)))
    cue = list(tok.encode(CUE))
    head = [bos] if bos is not None else []
    n_fill = context - len(needle) - len(cue) - len(head)
    if n_fill < 16 or n_fill > len(filler_ids):
        raise ValueError(f"context {context} does not fit: {n_fill} filler tokens, {len(filler_ids)} available")
    pos = int(round(depth * n_fill))
    return head + filler_ids[:pos] + needle + filler_ids[pos:n_fill] + cue


def answer(model, tok, prompt, cache, chunk=512, max_tokens=10) -> str:
    """Greedy continuation of `prompt` with `cache`."""
    x = mx.array(prompt)[None]
    for s in range(0, x.shape[1], chunk):
        logits = model(x[:, s : s + chunk], cache=cache)
        mx.eval(logits)
    out = []
    for _ in range(max_tokens):
        t = int(mx.argmax(logits[0, -1]).item())
        out.append(t)
        if t == tok.eos_token_id:
            break
        logits = model(mx.array([[t]]), cache=cache)
    return tok.decode(out)


def filler(tok, path, n, code_pattern="pass-code"):
    text = texts.resolve(path).read_text(encoding="utf-8", errors="replace")
    assert code_pattern not in text and "blue vault" not in text, "the needle occurs in the filler text"
    ids = list(tok.encode(text[: 8 * n + 1000]))
    return text, ids


def main(args, base, presets, argv):
    from tqdm import tqdm

    from tq_mlx.models import load

    model, tok = load(args.model)
    bos = tok.bos_token_id if "gemma" in getattr(model.args, "model_type", "") else None
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    names = [b for b in args.baselines.split(",") if b] + presets
    text, ids = filler(tok, args.text, max(contexts))
    rng = random.Random(args.seed)
    ctx = report.context(
        args.model,
        argv,
        text=str(args.text),
        contexts=contexts,
        depths=depths,
        needle=NEEDLE,
        cue=CUE,
        chunk=args.chunk,
        seed=args.seed,
    )
    res = report.Results(f"{base}.json", ctx, resume=args.resume)
    jobs = []
    for n in contexts:
        for dep in depths:
            code = make_code(rng)
            assert code not in text, f"pass-code {code} occurs in the filler"
            jobs += [(n, dep, code, name) for name in names]
    try:
        for n, dep, code, name in tqdm(jobs, desc="niah", disable=args.no_progress):
            key = f"{name}@{n}@{dep}"
            if res.done(key):
                continue
            rec = {"name": name, "context": n, "depth": dep, "code": code}
            try:
                prompt = build_prompt(tok, ids, n, dep, code, bos)
                out = answer(model, tok, prompt, quality.make_cache(model, name), args.chunk)
                rec.update(answer=out, correct=code in out)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
            res.add(key, rec)
    finally:
        files = write(res, base, contexts, depths, names, ctx)
    return files


def accuracy(entries, name):
    rs = [r for r in entries.values() if r["name"] == name and "correct" in r]
    return sum(r["correct"] for r in rs) / len(rs) if rs else None


def write(res, base, contexts, depths, names, ctx):
    e = res.entries
    rows = []
    for name in names:
        row = {"name": name, "acc": accuracy(e, name)}
        for n in contexts:
            cells = [e.get(f"{name}@{n}@{d}", {}) for d in depths]
            row[str(n)] = "".join("-" if "correct" not in c else ("Y" if c["correct"] else "n") for c in cells)
        rows.append(row)
    cols = ["name", "acc"] + [str(n) for n in contexts]
    md = report.write_md(
        f"{base}.md",
        f"Needle in a haystack: {ctx.get('model')}",
        ctx,
        [
            (
                f"Retrieval per context; one letter per depth {depths} (Y found, n missed, - not run)",
                report.md_table(rows, cols, ["cache", "accuracy"] + [f"{n} tok" for n in contexts]),
            )
        ],
    )
    plt = report.plt()
    k = len(names)
    fig, axes = plt.subplots(1, k, figsize=(2.2 * k + 1, 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = [[float(e.get(f"{name}@{n}@{d}", {}).get("correct", float("nan"))) for n in contexts] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(contexts)), [str(n) for n in contexts], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("context", fontsize=7)
    axes[0][0].set_ylabel("needle depth", fontsize=7)
    fig.suptitle(f"Needle retrieval (green = found): {ctx.get('model')}", fontsize=9)
    png = report.save_fig(fig, f"{base}.png", ctx)
    return [res.path, md, png]
