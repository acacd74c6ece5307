"""Small building blocks shared by every family: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh import kernels
from expertmesh.kernels.cpu_linear import linear

if TYPE_CHECKING:
    from expertmesh.model.adapters import LinearAdapters


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Linear(nn.Linear):
    """nn.Linear whose CPU inference path runs on oneDNN (see kernels.cpu_linear).

    Weights narrower than the activations (bf16 weights under float32 activations, `activation_dtype`) run as
    llama.cpp runs them: the input rounded to bf16, float32 sums and output (`kernels.linear_mixed`)."""

    adapters: LinearAdapters | None = None  # LoRA adapters served on this layer, per row (model/adapters.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return kernels.linear_mixed(x, self.weight, self.bias)
        y = linear(x, self.weight, self.bias)
        return y if self.adapters is None else self.adapters.add_rows(x, y)
