"""`check_checkpoint` finds a bad config or a damaged safetensors file from the headers alone, with the same
message the loader gives for the same file."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from expertmesh.model import check_checkpoint
from expertmesh.model.safetensors_header import DTYPE_SIZES, read_header
from expertmesh.model.weights import _DTYPES, SafetensorsCheckpoint
from expertmesh.testing import write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def copy(ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "copy"))


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_a_whole_checkpoint_passes_and_gives_its_config(ckpt):
    config = check_checkpoint(ckpt)
    assert config.model_type == "deepseek_v3"


def test_unsupported_model_type(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama'; supported: deepseek_v2"):
        check_checkpoint(copy)


@pytest.mark.parametrize("text, needle", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_config_that_does_not_parse(copy, text, needle):
    (copy / "config.json").write_text(text)
    with pytest.raises(ValueError, match=needle):
        check_checkpoint(copy)


def test_config_field_of_the_wrong_type_is_a_value_error(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "two"}))
    with pytest.raises(ValueError, match="has a field of the wrong type"):
        check_checkpoint(copy)


def test_truncated_file_names_the_file_and_a_tensor_and_matches_the_loader(copy):
    weights = copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"lies past the end of the file \(truncated download\?\)") as checked:
        check_checkpoint(copy)
    assert str(weights) in str(checked.value)
    with pytest.raises(ValueError) as loaded:
        SafetensorsCheckpoint(copy)
    assert str(loaded.value) == str(checked.value)


@pytest.mark.parametrize("size, needle", [(5, "shorter than its header"), (200, "past end of file")])
def test_file_cut_inside_its_header(copy, size, needle):
    os.truncate(copy / "model.safetensors", size)
    with pytest.raises(ValueError, match=needle):
        check_checkpoint(copy)


def test_corrupt_header_json(copy):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8] = ord("#")
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        check_checkpoint(copy)


@pytest.mark.parametrize("edit, needle", [
    (lambda e: e.update(dtype="C64"), "unsupported dtype 'C64'"),
    (lambda e: e.update(shape=[1, -2]), "corrupt header entry"),
    (lambda e: e.update(data_offsets=[8, 0]), "corrupt header entry"),
    (lambda e: e.update(shape=[e["shape"][0] + 1, *e["shape"][1:]]), "needs"),
])
def test_bad_tensor_entry_is_named(copy, edit, needle):
    weights = copy / "model.safetensors"
    name = "model.embed_tokens.weight"
    _rewrite_header(weights, lambda header: edit(header[name]))
    with pytest.raises(ValueError, match=needle) as e:
        check_checkpoint(copy)
    assert name in str(e.value)


def test_index_naming_a_tensor_its_file_does_not_hold(copy):
    names = list(read_header(copy / "model.safetensors"))
    weight_map = {n: "model.safetensors" for n in names} | {"model.extra.weight": "model.safetensors"}
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="'model.extra.weight' in model.safetensors, which does not hold it"):
        check_checkpoint(copy)


def test_no_tensor_data_is_read(ckpt, monkeypatch):
    """Headers only: no file is mapped, and reading stays within each header."""
    import mmap

    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: pytest.fail("check_checkpoint mapped a file"))
    check_checkpoint(ckpt)


def test_header_dtypes_are_the_loaders():
    assert set(DTYPE_SIZES) == set(_DTYPES)
    for name, dtype in _DTYPES.items():
        assert torch.empty((), dtype=dtype).element_size() == DTYPE_SIZES[name]
