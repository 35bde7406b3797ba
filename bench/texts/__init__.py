"""Benchmark texts shipped with tq-mlx (see README.md in this folder): `path("persuasion")`."""

from importlib import resources
from pathlib import Path

NAMES = ("persuasion", "pride_and_prejudice", "mlx_lm_models")


def path(name: str) -> Path:
    """The file of a shipped text, by name (one of NAMES) or file name."""
    stem = name[:-4] if name.endswith(".txt") else name
    if stem not in NAMES:
        raise ValueError(f"unknown benchmark text {name!r}; shipped: {', '.join(NAMES)}")
    return Path(resources.files(__name__).joinpath(f"{stem}.txt"))


def read(name: str) -> str:
    return path(name).read_text(encoding="utf-8")


def resolve(ref) -> Path:
    """A shipped text's file for its name, else ref as a path to an existing file."""
    stem = str(ref)[:-4] if str(ref).endswith(".txt") else str(ref)
    if stem in NAMES:
        return path(stem)
    p = Path(ref).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text {ref!r} is neither a shipped text ({', '.join(NAMES)}) nor a file")
    return p
