"""tq-cache-prompt: mlx_lm.cache_prompt on a TurboQuant-compressed KV cache.

    tq-cache-prompt --prompt "$(cat report.txt)" --prompt-cache-file report.safetensors --kv k4v3
    tq-generate --prompt-cache-file report.safetensors --prompt "Summarise the report."

Every mlx_lm.cache_prompt flag works; --kv, --kv-window and --kv-boundary-layers choose the
cache, and the file reloads with `tq-generate --prompt-cache-file` or `tq_mlx.load_prompt_cache`.
No --model means the bundled SmolLM2-135M-Instruct.
"""

import importlib
import sys

from . import mlx_lm_hook
from .bundled import DEFAULT_MODEL
from .tq_generate import kv_summary

mlx_cache_prompt = importlib.import_module("mlx_lm.cache_prompt")
_save_prompt_cache = mlx_cache_prompt.save_prompt_cache


def save_prompt_cache(file_name, cache, metadata=None):
    """mlx-lm's save_prompt_cache, after printing the cache's size."""
    print(kv_summary(cache))
    _save_prompt_cache(file_name, cache, metadata)


def main(argv=None) -> int:
    """Run mlx_lm.cache_prompt's main() with TurboQuant caches; argv defaults to sys.argv[1:]."""
    try:
        with mlx_lm_hook.installed(
            mlx_cache_prompt,
            prog="tq-cache-prompt",
            argv=argv,
            defaults={"model": DEFAULT_MODEL},
            extra={"save_prompt_cache": save_prompt_cache},
        ):
            mlx_cache_prompt.main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (mlx_lm_hook.UnsupportedMlxLmError, OSError, ValueError, NotImplementedError) as e:
        print(f"tq-cache-prompt: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
