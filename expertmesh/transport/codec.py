"""torch tensors to and from the `Tensor` message of the data plane: raw bytes plus dtype and shape."""

from __future__ import annotations

import torch

from expertmesh.protos import expert_dispatch_pb2 as pb

_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """Copies a tensor's bytes (row-major, on the CPU) into a message."""
    if tensor.dtype not in _NAMES:
        raise ValueError(f"tensor dtype {tensor.dtype} cannot cross the data plane; use one of {sorted(_DTYPES)}")
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return pb.Tensor(dtype=_NAMES[tensor.dtype], shape=list(tensor.shape), data=data)


def from_proto(msg: pb.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """The tensor a message carries; ValueError naming `name` if its dtype, shape and bytes disagree."""
    if msg.dtype not in _DTYPES:
        raise ValueError(f"{name} has unknown dtype {msg.dtype!r}; expected one of {sorted(_DTYPES)}")
    dtype, shape = _DTYPES[msg.dtype], tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{name} has a negative dimension in shape {list(shape)}")
    expected = torch.Size(shape).numel() * dtype.itemsize
    if len(msg.data) != expected:
        raise ValueError(f"{name} carries {len(msg.data)} bytes but {msg.dtype} {list(shape)} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).view(shape)
