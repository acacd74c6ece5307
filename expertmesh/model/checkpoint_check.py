"""Checks a checkpoint directory before anything is loaded or started: its config.json parses into a
supported model, and every safetensors file's header is whole and its tensors lie inside the file. No tensor
is read, so a large checkpoint is checked in moments.

`expertmesh generate` and `expertmesh serve` both call it first, so a bad checkpoint gets the same one-line
error from either (the loader reads headers with the same code, so it says the same too).
"""

from __future__ import annotations

from pathlib import Path

from expertmesh.model.config import ModelConfig
from expertmesh.model.safetensors_header import read_header
from expertmesh.model.weights import INDEX_NAME, checkpoint_files, read_weight_map


def check_checkpoint(model_dir: str | Path) -> ModelConfig:
    """The checkpoint's config; ValueError (OSError for an unreadable file) naming the first problem."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    headers = {path.name: read_header(path) for path in checkpoint_files(model_dir)}
    if (model_dir / INDEX_NAME).is_file():
        for name, file in read_weight_map(model_dir).items():
            if name not in headers[file]:
                raise ValueError(f"{INDEX_NAME} puts tensor {name!r} in {file}, which does not hold it")
    return config
