"""tq-generate: mlx_lm.generate on a TurboQuant-compressed KV cache.

    tq-generate --prompt "What is the capital of France?" --kv k4v4
    echo "Summarise: ..." | tq-generate --prompt - --max-tokens 64 --kv k4v3-fast
    tq-generate --prompt-cache-file ctx.safetensors --prompt "And the second?"   # from tq-cache-prompt
    mlx.launch --backend ring -n 3 --python "$(which python)" "$(which tq-generate)" --prompt "Hi" --kv k4v4

Every mlx_lm.generate flag works (mlx-lm's own main() runs, see `mlx_lm_hook`); --kv,
--kv-window and --kv-boundary-layers choose the cache, and the stats end with its size.
No --model means the bundled SmolLM2-135M-Instruct.  Under mlx.launch the model is sharded
over the processes (`distributed`): rank 0 prints and reads stdin, each rank holds its own KV heads.
"""

import importlib
import sys

import tq_mlx
from tq_mlx import describe

from . import distributed, mlx_lm_hook
from .watchdog import Watchdog, run_command

mlx_generate = importlib.import_module("mlx_lm.generate")  # mlx_lm.generate is also a function

_generate = mlx_generate.generate
_stream_generate = mlx_generate.stream_generate
ERRORS = (mlx_lm_hook.UnsupportedMlxLmError, OSError, ValueError, NotImplementedError)


def kv_summary(cache, group=None) -> str:
    """One line: bytes held, tokens, config, and what mlx-lm's fp16 cache would hold; on a group of
    several processes (every rank must call it: the figures are gathered) the totals of all ranks,
    then each rank's bytes."""
    held, fp16 = describe.cache_nbytes(cache), sum(describe.fp16_bytes(c) for c in cache)
    per_rank = None
    if group is not None and group.size() > 1:
        per_rank = distributed.gather_ints([held, fp16], group)
        held, fp16 = sum(r[0] for r in per_rank), sum(r[1] for r in per_rank)
    tokens = max((c.size() for c in cache), default=0)
    names = sorted({c.config.name for c in cache if isinstance(c, tq_mlx.TurboQuantKVCache)})
    line = (
        f"KV cache: {held / 1e6:.3f} MB for {tokens} tokens ({', '.join(names) or 'no TurboQuant layers'}; "
        f"fp16 would take {fp16 / 1e6:.3f} MB)"
    )
    if per_rank is not None:
        line += f"; per rank: {', '.join(str(r[0]) for r in per_rank)} bytes"
    return line


def generate(model, tokenizer, prompt, verbose=False, group=None, **kwargs):
    """mlx_lm.generate.generate, holding the cache so that its size joins the verbose stats."""
    if kwargs.get("prompt_cache") is None:
        if kwargs.get("draft_model") is None:
            cache = mlx_generate.make_prompt_cache(model, max_kv_size=kwargs.get("max_kv_size"))
        else:  # as speculative_generate_step builds them: the model's layers, then the draft's
            cache = mlx_generate.make_prompt_cache(model) + mlx_generate.make_prompt_cache(kwargs["draft_model"])
        kwargs["prompt_cache"] = cache
    text = _generate(model, tokenizer, prompt, verbose=verbose, **kwargs)
    if verbose and text:
        print(kv_summary(kwargs["prompt_cache"], group))
    return text


def watched(watchdog):
    """mlx-lm's stream_generate, each prefill chunk and token a beat of `watchdog` (armed meanwhile)."""

    def stream_generate(model, tokenizer, prompt, **kwargs):
        with watchdog.armed():
            kwargs.setdefault("prompt_progress_callback", watchdog.beat)
            for response in _stream_generate(model, tokenizer, prompt, **kwargs):
                watchdog.beat()
                yield response

    return stream_generate


def main(argv=None) -> int:
    """Run mlx_lm.generate's main() with TurboQuant caches; argv defaults to sys.argv[1:]."""
    group = distributed.world()
    where = distributed.label(group)
    dog = Watchdog(0, "tq-generate", where)
    extra = {"generate": lambda *a, **k: generate(*a, group=group, **k)}
    if group.size() > 1:
        extra["stream_generate"] = watched(dog)

    def body():
        hook = mlx_lm_hook.installed(
            mlx_generate, prog="tq-generate", argv=argv, extra=extra, group=group, watchdog=dog
        )
        with distributed.rank0_output(group), hook:
            mlx_generate.main()

    try:
        return run_command("tq-generate", where, body, ERRORS)
    finally:
        dog.close()


if __name__ == "__main__":
    sys.exit(main())
