"""The int8 modules `quantize_model` puts in place of float ones: int8 weights with one float32 scale per output
row (`kernels.quantize_int8`), called as the modules they replace are. `quantize_activations` (w8a8): at decode
sizes the kernels quantise the activations too, in blocks of 32 (`kernels.quantize_activations_q8`); it is set
only where every input size is a multiple of 32."""

from __future__ import annotations

import torch
from torch import nn

from expertmesh import kernels
from expertmesh.model.moe import RoutedExperts


class Int8RoutedExperts(nn.Module):
    """A block's routed experts as int8 weights and per-row scales; called as `RoutedExperts` is."""

    adapters = None  # LoRA adapters are served on float experts only

    def __init__(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                 quantize_activations: bool = False):
        super().__init__()
        self.quantize_activations = quantize_activations
        self.register_buffer("w13", w13)  # [E, 2I, H] int8
        self.register_buffer("w13_scale", w13_scale)  # [E, 2I] float32
        self.register_buffer("w2", w2)  # [E, H, I] int8
        self.register_buffer("w2_scale", w2_scale)  # [E, H] float32

    @classmethod
    def from_float(cls, experts: RoutedExperts, quantize_activations: bool = False) -> Int8RoutedExperts:
        w13, s13 = kernels.quantize_int8(experts.w13)
        w2, s2 = kernels.quantize_int8(experts.w2)
        quantize_activations &= w13.shape[2] % kernels.Q8_BLOCK == 0 and w2.shape[2] % kernels.Q8_BLOCK == 0
        return cls(w13.contiguous(), s13, w2.contiguous(), s2, quantize_activations)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return kernels.fused_moe_int8(x, self.w13, self.w13_scale, self.w2, self.w2_scale, topk_weights, topk_ids,
                                      self.quantize_activations)


class Int8Linear(nn.Module):
    """A `Linear` as int8 weights and per-row scales; called as `Linear` is."""

    adapters = None  # LoRA adapters are served on float weights only

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 quantize_activations: bool = False):
        super().__init__()
        self.quantize_activations = quantize_activations
        self.register_buffer("qweight", qweight)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N] float32
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, quantize_activations: bool = False) -> Int8Linear:
        q, scale = kernels.quantize_int8(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.contiguous(), scale, bias, quantize_activations and q.shape[1] % kernels.Q8_BLOCK == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear_int8(x, self.qweight, self.scale, self.bias, self.quantize_activations)
