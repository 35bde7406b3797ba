"""tq-bench: speed, quality, needle-in-a-haystack and memory benchmarks of tq-mlx caches.

    tq-bench quality --model smollm2-135m --text persuasion --tokens 512 --out bench/results
    tq-bench speed --contexts 1024,4096,16384 --out bench/results
    tq-bench niah --text persuasion --out bench/results
    tq-bench memory --model gemma3-270m --out bench/results

Each writes <out>/<command>-<model>.json (incrementally; --resume skips finished
entries), a markdown table and PNG plots.
"""

import argparse
import re
import sys
from pathlib import Path

DEFAULT_PRESETS = "k8v8,k8v4,k4v8,k4v4,k4v3,k3v4,k3v3,k2v2,2.5,3.5-split,k4v4-qjl,hqmq-s24r3,hqmq-s96r4,hqmq-s192r6"


def _list(s, cast=str):
    return [cast(x) for x in s.split(",") if x.strip()] if s else []


def _ctx_len(s):
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def parser():
    p = argparse.ArgumentParser(prog="tq-bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model=True):
        if model:
            sp.add_argument("--model", default="smollm2-135m", help="bundled alias, .gguf path or mlx-lm model")
        sp.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated tq-mlx presets")
        sp.add_argument("--out", default="bench/results", help="output folder")
        sp.add_argument("--tag", default=None, help="file name stem (default <command>-<model>)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--resume", action="store_true", help="keep finished entries of an earlier run")
        sp.add_argument("--no-progress", action="store_true")

    sp = sub.add_parser("speed", help="decode ms/token, prefill tok/s, peak memory per cache and context")
    common(sp)
    sp.add_argument("--contexts", default="1k,4k,16k,32k,64k,128k")
    sp.add_argument("--max-context", type=_ctx_len, default=16384)
    sp.add_argument("--prefill-max", type=_ctx_len, default=1024, help="real prefill up to this context")
    sp.add_argument("--baselines", default="fp,affine4,affine8")
    sp.add_argument("--steps", type=int, default=3, help="timed decode steps (after one warm-up)")
    sp.add_argument("--no-attention", action="store_true", help="skip the per-layer attention timing")
    sp.add_argument("--no-model", action="store_true", help="only the per-layer attention timing")

    sp = sub.add_parser("quality", help="perplexity, KL and top-1 agreement vs the fp cache")
    common(sp)
    sp.add_argument(
        "--text",
        default="persuasion",
        help="a shipped text (persuasion, pride_and_prejudice, mlx_lm_models) or a UTF-8 file (default: %(default)s)",
    )
    sp.add_argument("--offset", type=int, default=20000, help="start character in the text")
    sp.add_argument("--tokens", type=int, default=512)
    sp.add_argument("--chunk", type=int, default=256)
    sp.add_argument("--baselines", default="fp,affine8,affine4,affine3,affine2")

    sp = sub.add_parser("niah", help="needle-in-a-haystack retrieval grid")
    common(sp)
    sp.add_argument(
        "--text", default="persuasion", help="filler: a shipped text or a UTF-8 file (default: %(default)s)"
    )
    sp.add_argument("--contexts", default="512,1024,2048")
    sp.add_argument("--depths", default="0.1,0.5,0.9")
    sp.add_argument("--chunk", type=int, default=512)
    sp.add_argument("--baselines", default="fp,affine4")

    sp = sub.add_parser("memory", help="model of KV bytes per token and cache size, checked against nbytes")
    common(sp, model=False)
    sp.add_argument("--model", default="smollm2-135m", help="bundled alias (loaded) or a config.json path")
    sp.add_argument("--contexts", default="1k,4k,16k,32k,128k")
    sp.add_argument("--check-context", type=_ctx_len, default=1024, help="context of the measured check")
    sp.add_argument("--fp-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    sp.add_argument("--boundary-layers", type=int, default=0)
    return p


def stem(args) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(args.model)).stem if "/" in str(args.model) else args.model)
    return args.tag or f"{args.command}-{name}"


def main(argv=None):
    args = parser().parse_args(argv)
    import mlx.core as mx

    from . import report

    report.warn_blas()
    mx.random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    presets = _list(args.presets)
    try:
        if args.command == "quality":
            files = _quality(args, out / stem(args), presets, argv)
        else:
            import importlib

            mod = importlib.import_module(f".{args.command}", __package__)
            files = mod.main(args, out / stem(args), presets, argv)
    except KeyboardInterrupt:
        print("\ninterrupted: finished entries are kept in the JSON (rerun with --resume)", file=sys.stderr)
        return 130
    for f in files:
        print(f)
    return 0


def _quality(args, base, presets, argv):
    from tq_mlx.models import load

    from . import quality, report

    model, tok = load(args.model)
    bos = "gemma" in getattr(model.args, "model_type", "")
    tokens = quality.text_tokens(tok, args.text, args.tokens, args.offset, bos=bos)
    ctx = report.context(
        args.model, argv, text=str(args.text), offset=args.offset, tokens=len(tokens), chunk=args.chunk, seed=args.seed
    )
    res = report.Results(f"{base}.json", ctx, resume=args.resume)
    names = _list(args.baselines) + [p for p in presets if p not in _list(args.baselines)]
    try:
        quality.run(model, tokens, names, res, args.chunk, progress=not args.no_progress)
    finally:
        md = report.write_md(
            f"{base}.md",
            f"Quality: {args.model}",
            ctx,
            [
                (
                    f"{len(tokens)} tokens, chunk {args.chunk}; * = Pareto front (bits per token vs mean KL)",
                    quality.table(res.entries),
                )
            ],
        )
        png = quality.plot(res.entries, f"{base}.png", ctx)
    return [res.path, md, png]


if __name__ == "__main__":
    sys.exit(main())
