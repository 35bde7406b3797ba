"""tq-cache-prompt: mlx_lm.cache_prompt on a TurboQuant-compressed KV cache.

    tq-cache-prompt --prompt "$(cat report.txt)" --prompt-cache-file report.safetensors --kv k4v3
    tq-generate --prompt-cache-file report.safetensors --prompt "Summarise the report."

Every mlx_lm.cache_prompt flag works; --kv, --kv-window and --kv-boundary-layers choose the
cache, and the file reloads with `tq-generate --prompt-cache-file` or `tq_mlx.load_prompt_cache`.
No --model means the bundled SmolLM2-135M-Instruct.  Under mlx.launch each rank writes its own KV heads to
`NAME.rank{r}-of-{N}.safetensors`, which `tq-generate --prompt-cache-file NAME.safetensors` under the same
launch reads back (each rank its own).
"""

import importlib
import sys

from . import distributed, mlx_lm_hook
from .bundled import DEFAULT_MODEL
from .tq_generate import ERRORS, kv_summary
from .watchdog import run_command

mlx_cache_prompt = importlib.import_module("mlx_lm.cache_prompt")
_save_prompt_cache = mlx_cache_prompt.save_prompt_cache


def save_prompt_cache(file_name, cache, metadata=None, group=None):
    """mlx-lm's save_prompt_cache, after printing the cache's size; on a group of several processes each
    rank writes its own KV heads to its own file (`distributed.rank_path`)."""
    print(kv_summary(cache, group))
    _save_prompt_cache(file_name if group is None else distributed.rank_path(file_name, group), cache, metadata)


def main(argv=None) -> int:
    """Run mlx_lm.cache_prompt's main() with TurboQuant caches; argv defaults to sys.argv[1:]."""
    group = distributed.world()

    def body():
        hook = mlx_lm_hook.installed(
            mlx_cache_prompt,
            prog="tq-cache-prompt",
            argv=argv,
            defaults={"model": DEFAULT_MODEL},
            extra={"save_prompt_cache": lambda *a, **k: save_prompt_cache(*a, group=group, **k)},
            group=group,
        )
        with distributed.rank0_output(group), hook:
            mlx_cache_prompt.main()

    return run_command("tq-cache-prompt", distributed.label(group), body, ERRORS)


if __name__ == "__main__":
    sys.exit(main())
