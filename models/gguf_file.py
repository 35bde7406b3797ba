"""Read a GGUF file's metadata and tensor table.

``gguf.GGUFReader`` builds a numpy view per array element, which takes
~15 s on Gemma-3's 262k-token vocabulary. This reader parses the same
layout (GGUF v2/v3, little-endian) in well under a second and leaves the
tensor bytes memory-mapped.
"""

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"

# GGUF value type -> (struct format, numpy dtype)
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    """One tensor's entry: ``shape`` is numpy order (outermost first) and
    ``data`` the raw bytes (uint8, memory-mapped)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


def _read_str(buf, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, off)
    off += 8
    return buf[off : off + n].decode("utf-8", errors="replace"), off + n


def _read_value(buf, off: int, vtype: int) -> tuple[Any, int]:
    if vtype == _STRING:
        return _read_str(buf, off)
    if vtype in _SCALARS:
        fmt, _ = _SCALARS[vtype]
        return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)
    if vtype == _ARRAY:
        itype, n = struct.unpack_from("<IQ", buf, off)
        off += 12
        if itype in _SCALARS:
            dtype = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
            arr = np.frombuffer(buf, dtype=dtype, count=n, offset=off)
            return arr.tolist(), off + n * dtype.itemsize
        if itype == _STRING:
            out = []
            for _ in range(n):
                s, off = _read_str(buf, off)
                out.append(s)
            return out, off
        values = []
        for _ in range(n):
            v, off = _read_value(buf, off, itype)
            values.append(v)
        return values, off
    raise ValueError(f"Unknown GGUF value type {vtype}")


def read_gguf(path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """Parse ``path`` into ``(metadata, tensors)``.

    Metadata values are Python scalars, strings or lists. Tensors keep GGUF
    file order; their data is not copied.
    """
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (bad magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version}")
    off = 24
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, off = _read_str(buf, off)
        (vtype,) = struct.unpack_from("<I", buf, off)
        meta[key], off = _read_value(buf, off + 4, vtype)

    infos = []
    for _ in range(n_tensors):
        name, off = _read_str(buf, off)
        (n_dims,) = struct.unpack_from("<I", buf, off)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
        off += 4 + 8 * n_dims
        qtype, rel = struct.unpack_from("<IQ", buf, off)
        off += 12
        infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), rel))

    align = int(meta.get("general.alignment", 32))
    start = (off + align - 1) // align * align
    tensors = {}
    for name, shape, qtype, rel in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) * type_size // block
        data = np.frombuffer(buf, np.uint8, count=nbytes, offset=start + rel)
        tensors[name] = GGUFTensor(name, qtype, shape, data)
    return meta, tensors
