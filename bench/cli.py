"""tq-bench: speed, quality, needle-in-a-haystack and memory benchmarks of tq-mlx caches.

    tq-bench quality --model smollm2-135m --text persuasion --tokens 512
    tq-bench speed --contexts 1024,4096,16384
    tq-bench niah --text persuasion
    tq-bench memory --model gemma3-270m
    tq-bench batch --contexts 4k,16k --batches 1,4,8
    tq-bench mac-check                       # on a Mac: every kernel checked, decode timed

Each writes <out>/<command>-<model>.json (incrementally; --resume skips finished
entries), a markdown table and PNG plots; <out> is ./tq-bench-results unless given.
"""

import argparse
import re
import sys
from pathlib import Path

OUT = "tq-bench-results"
DEFAULT_PRESETS = (
    "k8v8,k8v4,k4v8,k4v4,k4v3,k3v4,k3v3,k2v2,2.5,3.5-split,k4v4-qjl,k4v4-tcq,k3v3-tcq,k2v2-tcq,"
    "hqmq-s24r3,hqmq-s96r4,hqmq-s192r6"
)


def _list(s, cast=str):
    return [cast(x) for x in s.split(",") if x.strip()] if s else []


def _ctx_len(s):
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def parser():
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="tq-bench", description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, model=True, presets=DEFAULT_PRESETS):
        if model:
            sp.add_argument("--model", default="smollm2-135m", help="bundled alias, .gguf path or mlx-lm model")
        if presets:
            sp.add_argument("--presets", default=presets, help="comma-separated tq-mlx presets")
        sp.add_argument("--out", default=OUT, help="output folder (the repository's bench/results only if you ask)")
        sp.add_argument("--tag", default=None, help="file name stem; default <command>-<model>")
        sp.add_argument(
            "--seed",
            type=int,
            default=0,
            help="random seed (queries, fillers, sampling; quality: the caches' rotations)",
        )
        sp.add_argument("--resume", action="store_true", help="keep the finished entries of an earlier run")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    sp = sub.add_parser(
        "speed", formatter_class=fmt, help="decode ms/token, prefill tok/s, peak memory per cache and context"
    )
    common(sp)
    sp.add_argument("--contexts", default="1k,4k,16k,32k,64k,128k", help="context lengths (k = 1024)")
    sp.add_argument("--max-context", type=_ctx_len, default=16384, help="skip contexts above this")
    sp.add_argument("--prefill-max", type=_ctx_len, default=1024, help="real prefill up to this context")
    sp.add_argument("--baselines", default="fp,affine4,affine8", help="mlx-lm caches to compare with")
    sp.add_argument("--steps", type=int, default=3, help="timed decode steps (after one warm-up)")
    sp.add_argument("--no-attention", action="store_true", help="skip the per-layer attention timing")
    sp.add_argument("--no-model", action="store_true", help="only the per-layer attention timing")

    sp = sub.add_parser("quality", formatter_class=fmt, help="perplexity, KL and top-1 agreement vs the fp cache")
    common(sp)
    sp.add_argument(
        "--text",
        default="persuasion",
        help="a shipped text (persuasion, pride_and_prejudice, mlx_lm_models) or a UTF-8 file",
    )
    sp.add_argument("--offset", type=int, default=20000, help="start character in the text")
    sp.add_argument("--tokens", type=int, default=512, help="tokens of text")
    sp.add_argument("--chunk", type=int, default=256, help="tokens per prefill chunk")
    sp.add_argument("--baselines", default="fp,affine8,affine4,affine3,affine2", help="mlx-lm caches to compare")
    sp.add_argument(
        "--quant-start",
        type=int,
        default=None,
        help="override every preset's quant_start (0: compress from the first token, to compare codecs)",
    )

    sp = sub.add_parser("niah", formatter_class=fmt, help="needle-in-a-haystack retrieval grid")
    common(sp)
    sp.add_argument("--text", default="persuasion", help="filler: a shipped text or a UTF-8 file")
    sp.add_argument("--contexts", default="512,1024,2048", help="context lengths")
    sp.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths (fraction of the context)")
    sp.add_argument("--chunk", type=int, default=512, help="tokens per prefill chunk")
    sp.add_argument("--baselines", default="fp,affine4", help="mlx-lm caches to compare with")

    sp = sub.add_parser(
        "memory", formatter_class=fmt, help="model of KV bytes per token and cache size, checked against nbytes"
    )
    common(sp, model=False)
    sp.add_argument("--model", default="smollm2-135m", help="bundled alias (loaded) or a config.json path")
    sp.add_argument("--contexts", default="1k,4k,16k,32k,128k", help="context lengths")
    sp.add_argument("--check-context", type=_ctx_len, default=1024, help="context of the measured check")
    sp.add_argument(
        "--fp-dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="dtype of the uncompressed layers and of the fp baseline",
    )
    sp.add_argument("--boundary-layers", type=int, default=0, help="first and last N layers uncompressed")

    sp = sub.add_parser(
        "batch", formatter_class=fmt, help="batched decode: tokens/s and memory for B sequences vs mlx-lm's fp batch"
    )
    common(sp, presets="k4v4")
    sp.add_argument("--contexts", default="4k,16k", help="context length of every sequence (k = 1024)")
    sp.add_argument("--batches", default="1,4,8", help="concurrent sequences")
    sp.add_argument("--steps", type=int, default=3, help="timed decode steps (after one warm-up)")

    sp = sub.add_parser(
        "mac-check",
        formatter_class=fmt,
        help="check every Metal kernel instantiation and time decode attention (run it on a Mac)",
    )
    common(sp, model=False, presets=None)
    sp.add_argument("--full", action="store_true", help="every instantiation on the emulator too (slow)")
    sp.add_argument("--dims", default="64,80,96,128,256", help="head dims to check")
    sp.add_argument("--contexts", default="1k,4k,16k,32k,64k", help="timed context lengths (Metal only)")
    sp.add_argument("--preset", default="k4v4", help="the TurboQuant preset timed")
    sp.add_argument("--repeats", type=int, default=10, help="timed repeats per point")
    return p


def stem(args) -> str:
    if not hasattr(args, "model"):
        return args.tag or args.command
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
    presets = _list(getattr(args, "presets", ""))
    try:
        if args.command == "quality":
            files = _quality(args, out / stem(args), presets, argv)
        elif args.command == "mac-check":
            from . import mac_check

            files = mac_check.main(args, out / stem(args), argv)
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
        args.model,
        argv,
        text=str(args.text),
        offset=args.offset,
        tokens=len(tokens),
        chunk=args.chunk,
        seed=args.seed,
        quant_start=args.quant_start,
    )
    res = report.Results(f"{base}.json", ctx, resume=args.resume)
    names = _list(args.baselines) + [p for p in presets if p not in _list(args.baselines)]
    try:
        extra = {} if args.quant_start is None else {"quant_start": args.quant_start}
        extra.update({"seed": args.seed} if args.seed else {})  # the caches' rotations (and QJL projections)
        quality.run(model, tokens, names, res, args.chunk, progress=not args.no_progress, **extra)
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
