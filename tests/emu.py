"""The Metal emulator for the kernel tests: tools/metal_emu, carried in this repository.

It runs the kernels' exact text on the CPU where MLX has no Metal back-end; on a Mac
the same tests run the real kernels.
"""

import contextlib
import sys
from pathlib import Path

EMU_DIR = Path(__file__).resolve().parents[1] / "tools" / "metal_emu"


def metal_emu():
    """The metal_emu package from tools/ (importable without installing it)."""
    if str(EMU_DIR) not in sys.path:
        sys.path.insert(0, str(EMU_DIR))
    import metal_emu.kernel  # noqa: F401
    import metal_emu.mlx_patch

    return metal_emu


@contextlib.contextmanager
def emulated(**kw):
    """Kernels built inside run on the emulator (check_races on by default), or on the real GPU on a Mac."""
    with metal_emu().mlx_patch.patched_mlx(**{"check_races": True, **kw}):
        yield
