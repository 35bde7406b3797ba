"""The wheel holds one namespace, tq_mlx, with models/chat/bench mapped in and the .metal kernels."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_folders_into_tq_mlx_and_ships_metal_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)], check=True
    )
    wheel = next(tmp_path.glob("tq_mlx-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in (
        "tq_mlx/__init__.py",
        "tq_mlx/models/__init__.py",
        "tq_mlx/chat/cli.py",
        "tq_mlx/bench/cli.py",
        "tq_mlx/metal_kernels/__init__.py",
    ):
        assert must in names
    metal = {p.name for p in (ROOT / "metal_kernels").glob("*.metal")} | {"tq_common.h"}
    assert metal and {f"tq_mlx/metal_kernels/{m}" for m in metal} <= names
    shipped = {f"tq_mlx/bench/texts/{t}.txt" for t in ("persuasion", "pride_and_prejudice", "mlx_lm_models")}
    assert shipped <= names
    assert not any(n.startswith(("models/", "chat/", "bench/", "tests/")) for n in names)


def test_checkout_imports_the_mapped_packages():
    import tq_mlx.bench
    import tq_mlx.chat
    import tq_mlx.models

    assert Path(tq_mlx.models.__file__).parent == ROOT / "models"


def _library_imports():
    """{module: set of tq_mlx library modules it imports}, function-level imports included."""
    graph = {}
    for f in (ROOT / "tq_mlx").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                deps.update(n.split(".")[0] for n in names)
        graph[f.stem] = {d for d in deps if (ROOT / "tq_mlx" / f"{d}.py").exists()}
    return graph


def test_the_library_has_no_import_cycle():
    graph, state = _library_imports(), {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
