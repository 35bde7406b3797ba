"""Shared output for the benchmarks: run context, incremental JSON, markdown tables, PNG plots.

Every output file carries `context()`: machine, MLX version and back-end,
which BLAS is in use, the model and the exact command line.
"""

import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def _loaded_libs() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def blas_info() -> dict:
    """Which BLAS the process uses: OpenBLAS preloaded or MLX's bundled one (Linux CPU)."""
    pre = os.environ.get("LD_PRELOAD", "")
    maps = _loaded_libs()
    return {
        "ld_preload": pre,
        "openblas_loaded": "openblas" in maps.lower() or "openblas" in pre.lower(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
    }


def backend() -> str:
    return "gpu" if mx.default_device().type == mx.gpu else "cpu"


def warn_blas():
    """Warn when a Linux CPU run is not using OpenBLAS (the bundled reference BLAS is ~10x slower)."""
    if sys.platform.startswith("linux") and backend() == "cpu" and not blas_info()["openblas_loaded"]:
        msg = (
            f"OpenBLAS is not preloaded: MLX's bundled reference BLAS is about 10x slower here. "
            f"Run with LD_PRELOAD={OPENBLAS}"
        )
        warnings.warn(msg, stacklevel=2)
        return msg
    return None


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        return ""


def source_hash() -> str:
    """sha1 of tq_mlx's sources as imported (the library may be uncommitted)."""
    import hashlib

    import tq_mlx

    h = hashlib.sha1()
    for f in sorted(Path(tq_mlx.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _mem_gb() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return 0.0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def context(model: str = None, argv=None, **extra) -> dict:
    """The run's context block (goes at the top of every JSON and markdown file)."""
    try:
        import mlx_lm

        mlx_lm_version = mlx_lm.__version__
    except Exception:
        mlx_lm_version = None
    ctx = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.system()} {platform.machine()}, {_cpu_name()}, {os.cpu_count()} cores, {_mem_gb()} GB",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version,
        "backend": backend(),
        "blas": blas_info(),
        "git": _git_commit(),
        "tq_mlx_src": source_hash(),
        "model": model,
        "command": " ".join(["tq-bench", *(sys.argv[1:] if argv is None else argv)]),
    }
    ctx.update(extra)
    return ctx


class Results:
    """A JSON results file written after every entry, so Ctrl-C keeps what is finished.

    With resume=True entries already in the file are kept and `done(key)` is true for those without an error.
    """

    def __init__(self, path, ctx: dict, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries = {}
        if resume and self.path.exists():
            self.entries = json.loads(self.path.read_text()).get("entries", {})
        self.ctx = ctx
        self.extra = {}
        self.write()

    def done(self, key: str) -> bool:
        """Finished without an error (errored entries are retried on --resume)."""
        return key in self.entries and "error" not in self.entries[key]

    def add(self, key: str, record: dict):
        self.entries[key] = record
        self.write()

    def write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"context": self.ctx, **self.extra, "entries": self.entries}, indent=1, default=_jsonable)
        )
        tmp.replace(self.path)


def _jsonable(x):
    if isinstance(x, mx.array):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}g}"
    return str(v)


def md_table(rows, cols, headers=None) -> str:
    """A markdown table of dict rows; cols are keys, headers their titles."""
    headers = headers or cols
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def context_md(ctx: dict) -> str:
    b = ctx.get("blas", {})
    blas = "OpenBLAS (preloaded)" if b.get("openblas_loaded") else "MLX bundled reference BLAS"
    return "\n".join(
        [
            f"- machine: {ctx.get('machine')}",
            f"- MLX {ctx.get('mlx')} ({ctx.get('backend')}), mlx-lm {ctx.get('mlx_lm')}, BLAS: {blas}",
            f"- model: {ctx.get('model')}; git {ctx.get('git')}; {ctx.get('time')}",
            f"- command: `{ctx.get('command')}`",
        ]
    )


def write_md(path, title: str, ctx: dict, sections) -> Path:
    """sections: list of (heading, markdown text)."""
    parts = [f"# {title}", "", context_md(ctx), ""]
    for head, text in sections:
        parts += [f"## {head}", "", text, ""]
    Path(path).write_text("\n".join(parts))
    return Path(path)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def style(i: int, baseline: bool = False) -> dict:
    """Plot keywords that tell up to 60 series apart: 10 colours x 6 marker/line combinations;
    baselines (mlx-lm's caches) in greys, dashed."""
    if baseline:
        return {"color": ("black", "dimgray", "gray", "darkgray")[i % 4], "ls": "--", "marker": "x"}
    markers, lines = "os^Dv*", ("-", "-.", ":")
    return {"color": f"C{i % 10}", "marker": markers[(i // 10) % 6], "ls": lines[(i // 10) % 3]}


def save_fig(fig, path, ctx: dict):
    """Save with a one-line context footer below the axes (room is made for it)."""
    foot = f"{ctx.get('model')} | MLX {ctx.get('mlx')} {ctx.get('backend')} | {ctx.get('machine')}"
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.text(0.01, 0.01, foot[:150], fontsize=6, color="gray", va="bottom")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt().close(fig)
    return Path(path)
