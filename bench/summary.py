"""One table from many `tq-bench quality` runs: mean KL (and top-1) per model, text and length, one column
per cache, so that a method is judged on every text at once.

    python -m tq_mlx.bench.summary bench/results/q13-*.json [--metric kl_mean|kl_coded|top1|ppl] [--out table.md]
"""

import argparse
import json
from pathlib import Path

from . import report


def load(paths) -> list[dict]:
    """Rows {model, text, tokens, git, <cache>: entry} from quality JSON files (runs that failed are kept
    with their error)."""
    rows = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        ctx = d["context"]
        row = {"model": ctx["model"], "text": Path(str(ctx["text"])).stem, "tokens": ctx["tokens"], "git": ctx["git"]}
        row.update(d["entries"])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["model"], r["tokens"], r["text"]))


def table(rows, caches, metric: str = "kl_mean", bits: bool = True) -> str:
    """Markdown: one line per run, `metric` per cache, and (`bits`) the whole-cache bits per element of each
    cache (the same for every run of one model and length)."""
    out = []
    for r in rows:
        line = {"model": r["model"], "tokens": r["tokens"], "text": r["text"]}
        for c in caches:
            e = r.get(c)
            if e is None:
                line[c] = "-"
            elif "error" in e:
                line[c] = "error"
            else:
                line[c] = report.fmt(e[metric], 4) if metric in e else "-"  # kl_coded: runs since 2026-12-01
        held = [report.fmt(r[c]["bpe_model"], 4) for c in caches if c != "fp" and "bpe_model" in r.get(c, {})]
        line["bits"] = " / ".join(held)
        out.append(line)
    cols = ["model", "tokens", "text", *caches]
    if not bits:
        return report.md_table(out, cols)
    return report.md_table(out, [*cols, "bits"], [*cols, "whole-cache bits/elem (same order)"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="+", help="quality JSON files written by tq-bench quality")
    p.add_argument("--caches", default=None, help="comma-separated caches to show (default: all, in file order)")
    p.add_argument(
        "--metric", default="kl_mean", choices=["kl_mean", "kl_coded", "kl_max", "top1", "ppl"], help="what to show"
    )
    p.add_argument("--no-bits", action="store_true", help="leave out the whole-cache bits column")
    p.add_argument("--out", default=None, help="write the table here as well as printing it")
    args = p.parse_args(argv)
    rows = load(args.files)
    if args.caches:
        caches = args.caches.split(",")
    else:
        caches = list(dict.fromkeys(k for r in rows for k in r if k not in ("model", "text", "tokens", "git")))
    text = table(rows, caches, args.metric, bits=not args.no_bits)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
