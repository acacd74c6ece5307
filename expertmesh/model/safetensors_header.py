"""Reads and checks one safetensors file's header (8-byte little-endian length, then JSON) without reading
any tensor data: what each tensor is and where its bytes lie, and that they lie inside the file.

The loader (`weights.py`) and the checkpoint check (`checkpoint_check.py`) both read headers here, so a bad
file gets the same message whichever of them finds it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

# Bytes per element of each dtype expertmesh reads.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
_MAX_HEADER = 100 * 2**20  # the format's own limit


@dataclass(frozen=True, slots=True)
class TensorSpan:
    dtype: str  # a key of DTYPE_SIZES
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: str | Path) -> dict[str, TensorSpan]:
    """Every tensor of the file by name; ValueError naming the file (and tensor) when the header is corrupt or
    a tensor's bytes lie past the end of the file (a truncated download)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {header_len} past end of file)")
        if header_len > _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header of {header_len} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} has a corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header: not a JSON object")
    base = 8 + header_len
    spans: dict[str, TensorSpan] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        spans[name] = span = _span(path, name, info, base)
        if span.end > size:
            raise ValueError(f"{path}: tensor {name!r} lies past the end of the file (truncated download?)")
    return spans


def _span(path: Path, name: str, info: object, base: int) -> TensorSpan:
    if not isinstance(info, dict):
        raise ValueError(f"{path}: tensor {name!r} has a corrupt header entry")
    dtype = info.get("dtype")
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise ValueError(f"{path}: tensor {name!r} has a corrupt header entry (shape {shape!r}, "
                         f"data_offsets {offsets!r})")
    start, end = offsets
    if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise ValueError(f"{path}: tensor {name!r} has {end - start} bytes, but its shape {shape} of {dtype} "
                         f"needs {math.prod(shape) * DTYPE_SIZES[dtype]}")
    return TensorSpan(dtype, tuple(shape), base + start, base + end)


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
