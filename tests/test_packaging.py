"""The wheel holds one namespace, tq_mlx, with models/chat/bench mapped in and the .metal kernels."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_folders_into_tq_mlx_and_ships_metal_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True)
    wheel = next(tmp_path.glob("tq_mlx-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ("tq_mlx/__init__.py", "tq_mlx/models/__init__.py", "tq_mlx/chat/cli.py",
                 "tq_mlx/bench/cli.py", "tq_mlx/metal_kernels/__init__.py"):
        assert must in names
    metal = {p.name for p in (ROOT / "metal_kernels").glob("*.metal")}
    assert metal and {f"tq_mlx/metal_kernels/{m}" for m in metal} <= names
    assert not any(n.startswith(("models/", "chat/", "bench/", "tests/")) for n in names)


def test_checkout_imports_the_mapped_packages():
    import tq_mlx.bench
    import tq_mlx.chat
    import tq_mlx.models

    assert Path(tq_mlx.models.__file__).parent == ROOT / "models"
