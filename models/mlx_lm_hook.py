"""The one hook between tq-mlx and mlx-lm's own command-line programs.

tq-generate, tq-server and tq-cache-prompt run mlx-lm's `main()` unchanged inside
`installed(...)`, which swaps a few names in that mlx-lm module and puts them back after.
mlx-lm binds these names at import, so patching `mlx_lm.models.cache` would reach nothing:

============================  ===================  =========================================
module                        name                 becomes
============================  ===================  =========================================
mlx_lm.generate, .server,     make_prompt_cache    TurboQuant caches: `tq_mlx.make_prompt_cache`
.cache_prompt                                      with the --kv, --kv-window and
                                                   --kv-boundary-layers settings
(the same three)              load                 `load`: bundled aliases and .gguf files via
                                                   `tq_mlx.models.load`, the rest via mlx-lm
(the same three)              argparse             the module's parser also takes the --kv flags
mlx_lm.generate               load_prompt_cache    `tq_mlx.load_prompt_cache`, checked against
                                                   the --kv flags when they are given
mlx_lm.generate               DEFAULT_MODEL        the bundled SmolLM2-135M-Instruct
mlx_lm.server                 LRUPromptCache       `TurboQuantPromptCache` (exact prefix reuse)
============================  ===================  =========================================

A command may add its own names (tq-server adds `run`, for its request checks). Only
mlx-lm >=0.32.2,<0.33 is tested; `check_version` refuses any other version.
"""

import argparse
import contextlib
import importlib.metadata
import io
import sys
import types

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion

import tq_mlx

from . import distributed
from .bundled import BUNDLED, DEFAULT_MODEL
from .loader import load as tq_load
from .watchdog import DEFAULT_TIMEOUT

TESTED_RANGE = ">=0.32.2,<0.33"
MODEL_HELP = (
    f"bundled alias ({', '.join(sorted(BUNDLED))}), .gguf file, mlx-lm model directory or "
    f"Hugging Face repo (default: the bundled {DEFAULT_MODEL})"
)


class UnsupportedMlxLmError(RuntimeError):
    """The installed mlx-lm is outside the range these wrappers are tested with."""


def mlx_lm_version() -> str:
    return importlib.metadata.version("mlx-lm")


def check_version(version: str | None = None) -> str:
    """The mlx-lm version, or UnsupportedMlxLmError when it is outside TESTED_RANGE."""
    version = version or mlx_lm_version()
    try:
        tested = SpecifierSet(TESTED_RANGE).contains(version, prereleases=False)
    except InvalidVersion:
        tested = False
    if not tested:
        raise UnsupportedMlxLmError(
            f"tq-mlx's mlx-lm commands are tested with mlx-lm {TESTED_RANGE}; this is mlx-lm "
            f"{version}, whose internals they patch, so they refuse to run rather than risk "
            f"running wrongly. Install a tested version: pip install 'mlx-lm{TESTED_RANGE}'"
        )
    return version


# ---- the --kv flags ---------------------------------------------------------
def add_kv_arguments(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("TurboQuant KV cache (tq-mlx)")
    g.add_argument(
        "--kv",
        default=None,
        metavar="PRESET",
        help=f"KV cache preset or kXvY (default: {tq_mlx.DEFAULT_PRESET}); presets: " + ", ".join(tq_mlx.PRESETS),
    )
    g.add_argument(
        "--kv-window",
        type=int,
        default=None,
        metavar="N",
        help="keep the most recent N tokens in fp16 (default: the preset's)",
    )
    g.add_argument(
        "--kv-boundary-layers",
        type=int,
        default=None,
        metavar="N",
        help="keep the first and last N layers in mlx-lm's fp cache (default: the preset's)",
    )
    g.add_argument(
        "--kv-quant-start",
        type=int,
        default=None,
        metavar="N",
        help="keep tokens exact until the cache holds N, then calibrate the codecs on them and compress "
        "(default: the preset's, 256)",
    )
    d = parser.add_argument_group("tensor parallel (under mlx.launch: one model and its cache split over processes)")
    d.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="end every process with an error when one step (a prefill chunk, a token) shared with the other "
        f"processes makes no progress for this long: a stalled rank (default: {DEFAULT_TIMEOUT:g}; 0: never)",
    )


class KVSettings:
    """The --kv flags, read when mlx-lm asks for a cache."""

    def __init__(self, kv=None, kv_window=None, kv_boundary_layers=None, group=None, kv_quant_start=None):
        self.group = group  # an mx.distributed group of several processes: one cache file per rank
        self.explicit = any(v is not None for v in (kv, kv_window, kv_boundary_layers, kv_quant_start))
        given = (("fp_window", kv_window), ("boundary_layers", kv_boundary_layers), ("quant_start", kv_quant_start))
        self.overrides = {k: v for k, v in given if v is not None}
        self.config = tq_mlx.resolve_config(kv, **self.overrides)  # ValueError names what is allowed

    @classmethod
    def from_args(cls, args):
        return cls(args.kv, args.kv_window, args.kv_boundary_layers, kv_quant_start=args.kv_quant_start)

    def make_prompt_cache(self, model, max_kv_size=None):
        """mlx-lm's make_prompt_cache(model, max_kv_size), with TurboQuant layers."""
        return tq_mlx.make_prompt_cache(model, self.config, max_kv_size=max_kv_size)

    def load_prompt_cache(self, file_name, return_metadata=False):
        """mlx-lm's load_prompt_cache; a file saved with other --kv settings than given is refused.
        Under a group each rank loads its own file (`distributed.rank_path`), saved by the same rank."""
        if self.group is not None:
            file_name = distributed.rank_path(file_name, self.group)
        return tq_mlx.load_prompt_cache(
            file_name, config=self.config if self.explicit else None, return_metadata=return_metadata, group=self.group
        )


# ---- models -------------------------------------------------------------------
def load(
    path_or_hf_repo,
    tokenizer_config=None,
    model_config=None,
    adapter_path=None,
    lazy=False,
    return_config=False,
    revision=None,
    trust_remote_code=False,
):
    """mlx_lm.utils.load's signature: bundled aliases and .gguf files through tq_mlx.models.load,
    mlx-lm directories and hub ids through mlx-lm (so its options keep working), float32 on a CPU."""
    ref = str(path_or_hf_repo)
    if ref in BUNDLED or ref.lower().endswith(".gguf"):
        if adapter_path is not None:
            raise ValueError(f"--adapter-path needs an mlx-lm model (directory or hub id), not the GGUF model {ref}")
        if (model_config or {}).get("quantize_activations"):
            raise ValueError(f"--quantize-activations needs a quantized mlx-lm model, not the GGUF model {ref}")
        model, tokenizer = tq_load(ref)
        options = tokenizer_config or {}
        if options.get("chat_template"):
            tokenizer.chat_template = options["chat_template"]
        if options.get("eos_token"):
            tokenizer.add_eos_token(options["eos_token"])
        config = dict(vars(model.args))
    else:
        from mlx_lm import utils

        model, tokenizer, config = utils.load(
            ref,
            tokenizer_config=tokenizer_config,
            model_config=model_config,
            adapter_path=adapter_path,
            lazy=lazy,
            return_config=True,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
        if mx.default_device().type == mx.cpu:
            model.set_dtype(mx.float32)  # as tq_mlx.models.load: CPU fp16/bf16 matmuls are slow
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def context_length(model):
    """The model's trained context (max_position_embeddings), or None where it does not say."""
    return getattr(getattr(model, "args", None), "max_position_embeddings", None)


# ---- the server's prompt cache --------------------------------------------------
def calibration_length(cache) -> int:
    """The most tokens any layer's codecs were calibrated on (0: uncalibrated, or no such layers)."""
    return max((getattr(c, "calibration_length", 0) or 0 for c in cache), default=0)


class _Entry(list):
    """A cached layer list that remembers its calibration length through deepcopy and trim."""

    calibration = 0


class TurboQuantPromptCache(LRUPromptCache):
    """mlx-lm's LRU prompt cache, reusing a prefix only where that is exact.

    A TurboQuant cache's codecs are calibrated on its first tokens; cut below them, the cached
    codes came from codecs that saw tokens the new request does not have, so a cold start would
    code it differently. Such a request is served cold. `max_bytes` is --prompt-cache-bytes,
    which mlx-lm 0.32 applies only when batching (never to TurboQuant or --kv-bits caches).
    """

    def __init__(self, max_size: int = 10, max_bytes=None):
        super().__init__(max_size, max_bytes if max_bytes is not None else 1 << 63)

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type="assistant"):
        entry = _Entry(prompt_cache)
        entry.calibration = calibration_length(prompt_cache)
        super().insert_cache(model, tokens, entry, cache_type=cache_type)

    def fetch_nearest_cache(self, model, tokens):
        cache, rest = super().fetch_nearest_cache(model, tokens)
        if cache is None:
            return None, tokens
        if len(tokens) - len(rest) < getattr(cache, "calibration", 0):
            return None, tokens
        return list(cache), rest


# ---- installing -------------------------------------------------------------------
def _parser_class(prog, argv, defaults, on_parsed):
    """An ArgumentParser that adds the --kv flags (after mlx-lm's own), parses argv and checks them."""

    class Parser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("prog", prog)
            super().__init__(*args, **kwargs)
            self._kv_added = False

        def parse_args(self, args=None, namespace=None):
            if not self._kv_added:
                add_kv_arguments(self)
                self.set_defaults(**defaults)
                for action in self._actions:
                    if "--model" in action.option_strings:
                        action.help = MODEL_HELP
                self._kv_added = True
            ns = super().parse_args(argv if args is None else args, namespace)
            if getattr(ns, "kv_bits", None) is not None:
                self.error(
                    f"--kv-bits is mlx-lm's affine KV quantization, which {prog} replaces: "
                    "choose the cache with --kv instead (e.g. --kv k4v4)"
                )
            try:
                on_parsed(ns, KVSettings.from_args(ns))
            except ValueError as e:
                self.error(str(e))
            return ns

    return Parser


def sharded_loader(group):
    """`load`, then the model sharded over `group` with mlx-lm's `model.shard` (mlx-lm models load lazily,
    so a rank reads only its share of the weights)."""

    def load_sharded(path_or_hf_repo, *args, **kwargs):
        out = load(path_or_hf_repo, *args, **{**kwargs, "lazy": True})
        distributed.shard_model(out[0], group)
        return out

    return load_sharded


def _share_input(args, group):
    """On a group: rank 0's random seed for every rank, and `--prompt -` read on rank 0 only, shared."""
    distributed.share_seed(group)
    if getattr(args, "prompt", None) == "-":
        text = distributed.read_stdin() if group.rank() == 0 else None
        sys.stdin = io.StringIO(distributed.broadcast(text, group))


@contextlib.contextmanager
def installed(module, *, prog, argv=None, defaults=None, extra=None, group=None, watchdog=None):
    """Run `module.main()` inside this: it parses argv (None: sys.argv[1:]) with the --kv flags
    under the name `prog`, and makes TurboQuant caches. `defaults` replace mlx-lm's argument
    defaults; `extra` maps more names of `module` to what they become.  `group`: an mx.distributed
    group of several processes: the model is sharded over it, input is read on rank 0 and shared,
    prompt-cache files are per rank; `watchdog` gets --dist-timeout."""
    check_version()
    kv_holder = {}
    group = group if group is not None and group.size() > 1 else None

    def parsed(args, kv):
        kv.group = group
        kv_holder["kv"] = kv
        if watchdog is not None:
            watchdog.timeout = args.dist_timeout
        if group is not None:
            _share_input(args, group)

    def make_prompt_cache(model, max_kv_size=None):
        return kv_holder["kv"].make_prompt_cache(model, max_kv_size)

    def load_prompt_cache(file_name, return_metadata=False):
        return kv_holder["kv"].load_prompt_cache(file_name, return_metadata)

    shim = types.ModuleType("argparse")
    shim.__dict__.update(vars(argparse))
    shim.ArgumentParser = _parser_class(prog, argv, defaults or {}, parsed)
    names = {"argparse": shim, "make_prompt_cache": make_prompt_cache, "load": load}
    if module.__name__ == "mlx_lm.generate":
        names.update(load_prompt_cache=load_prompt_cache, DEFAULT_MODEL=DEFAULT_MODEL)
    if module.__name__ == "mlx_lm.server":
        names["LRUPromptCache"] = TurboQuantPromptCache
    if group is not None:
        names["load"] = sharded_loader(group)
    names.update(extra or {})
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise UnsupportedMlxLmError(
            f"{module.__name__} has no {', '.join(missing)}: this mlx-lm is not the tested {TESTED_RANGE}"
        )
    saved = {n: getattr(module, n) for n in names}
    stdin = sys.stdin
    try:
        for n, v in names.items():
            setattr(module, n, v)
        yield
    finally:
        sys.stdin = stdin
        for n, v in saved.items():
            setattr(module, n, v)


__all__ = [
    "TESTED_RANGE",
    "KVSettings",
    "TurboQuantPromptCache",
    "UnsupportedMlxLmError",
    "add_kv_arguments",
    "calibration_length",
    "check_version",
    "context_length",
    "installed",
    "load",
    "sharded_loader",
]
