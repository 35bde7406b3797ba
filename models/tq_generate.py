"""tq-generate: mlx_lm.generate on a TurboQuant-compressed KV cache.

    tq-generate --prompt "What is the capital of France?" --kv k4v4
    echo "Summarise: ..." | tq-generate --prompt - --max-tokens 64 --kv k4v3-fast
    tq-generate --prompt-cache-file ctx.safetensors --prompt "And the second?"   # from tq-cache-prompt

Every mlx_lm.generate flag works (mlx-lm's own main() runs, see `mlx_lm_hook`); --kv,
--kv-window and --kv-boundary-layers choose the cache, and the stats end with its size.
No --model means the bundled SmolLM2-135M-Instruct.
"""

import importlib
import sys

import tq_mlx
from tq_mlx import describe

from . import mlx_lm_hook

mlx_generate = importlib.import_module("mlx_lm.generate")  # mlx_lm.generate is also a function

_generate = mlx_generate.generate


def kv_summary(cache) -> str:
    """One line: bytes held, tokens, config, and what mlx-lm's fp16 cache would hold."""
    held = sum(c.nbytes for c in cache)
    tokens = max((c.size() for c in cache), default=0)
    fp16 = sum(describe.fp16_bytes(c) for c in cache)
    names = sorted({c.config.name for c in cache if isinstance(c, tq_mlx.TurboQuantKVCache)})
    return (
        f"KV cache: {held / 1e6:.3f} MB for {tokens} tokens ({', '.join(names) or 'no TurboQuant layers'}; "
        f"fp16 would take {fp16 / 1e6:.3f} MB)"
    )


def generate(model, tokenizer, prompt, verbose=False, **kwargs):
    """mlx_lm.generate.generate, holding the cache so that its size joins the verbose stats."""
    if kwargs.get("prompt_cache") is None:
        if kwargs.get("draft_model") is None:
            cache = mlx_generate.make_prompt_cache(model, max_kv_size=kwargs.get("max_kv_size"))
        else:  # as speculative_generate_step builds them: the model's layers, then the draft's
            cache = mlx_generate.make_prompt_cache(model) + mlx_generate.make_prompt_cache(kwargs["draft_model"])
        kwargs["prompt_cache"] = cache
    text = _generate(model, tokenizer, prompt, verbose=verbose, **kwargs)
    if verbose and text:
        print(kv_summary(kwargs["prompt_cache"]))
    return text


def main(argv=None) -> int:
    """Run mlx_lm.generate's main() with TurboQuant caches; argv defaults to sys.argv[1:]."""
    try:
        with mlx_lm_hook.installed(mlx_generate, prog="tq-generate", argv=argv, extra={"generate": generate}):
            mlx_generate.main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (mlx_lm_hook.UnsupportedMlxLmError, OSError, ValueError, NotImplementedError) as e:
        print(f"tq-generate: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
