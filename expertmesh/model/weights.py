"""Weights by name from safetensors files, memory-mapped.

We parse the safetensors header ourselves (8-byte length + JSON, the whole format: `safetensors_header.py`)
instead of going through `safetensors.safe_open` because loading needs two things it does not expose:
tensors that are zero-copy views of the mapped file (so a parameter costs no second copy in RAM), and the
byte range of each tensor, so the pages of per-expert tensors can be dropped as soon as they are stacked into
`[E, ...]`. Nothing is ever unpickled: a checkpoint without safetensors files is rejected.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

from expertmesh.model.safetensors_header import read_header

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True, slots=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class _MappedFile:
    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, _Entry] = {
            name: _Entry(path, _DTYPES[span.dtype], span.shape, span.start, span.end)
            for name, span in read_header(path).items()
        }
        with open(path, "rb") as f:
            # ACCESS_COPY: a private mapping, so torch gets a writable buffer without copying any page.
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if any(e.end > len(self.mm) for e in self.entries.values()):  # shrunk since its header was read
            raise ValueError(f"{path} changed while it was being opened (truncated?)")


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names, else every *.safetensors."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"checkpoint directory {model_dir} does not exist")
    index = model_dir / INDEX_NAME
    if index.is_file():
        files = sorted({model_dir / f for f in read_weight_map(model_dir).values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index.name} names shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{model_dir} holds only pickled weights ({', '.join(pickled)}); expertmesh loads safetensors "
            "only (convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise ValueError(f"{model_dir} has no .safetensors weight files")


def read_weight_map(model_dir: str | Path) -> dict[str, str]:
    """Tensor name -> file name, from the directory's model.safetensors.index.json."""
    index = Path(model_dir) / INDEX_NAME
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{index} is not a safetensors index (JSON with a weight_map): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to file names")
    return weight_map


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory (one file or sharded with model.safetensors.index.json)."""

    def __init__(self, model_dir: str | Path):
        self._files_by_path = {p: _MappedFile(p) for p in checkpoint_files(model_dir)}
        self._entries: dict[str, _Entry] = {}
        for mf in self._files_by_path.values():
            self._entries.update(mf.entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of the mapped bytes."""
        e = self._entries[name]
        mm = self._files_by_path[e.file].mm
        if e.end == e.start:
            return torch.empty(e.shape, dtype=e.dtype)
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=e.end - e.start, offset=e.start)
        return flat.view(e.dtype).view(e.shape)

    def release(self, name: str) -> None:
        """Drops the resident pages of a tensor that has been copied elsewhere (e.g. stacked)."""
        e = self._entries[name]
        mm = self._files_by_path[e.file].mm
        page = mmap.PAGESIZE
        start = (e.start + page - 1) // page * page  # only whole pages inside this tensor
        end = e.end // page * page
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
