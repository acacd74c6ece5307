"""Weight-only quantisation of a loaded model, chosen by name (`quantization="int8"`).

"int8": every MoE block's routed experts become `Int8RoutedExperts`: int8 weights with one float32 scale per
output row of each expert (see `kernels/int8_moe.py`), a quarter of float32's bytes and half of bf16's, which
is what a memory-bound decode step reads. Attention, shared experts, dense layers, the gates and the LM head
stay in the checkpoint's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from expertmesh import kernels
from expertmesh.model.decoder import MoECausalLM
from expertmesh.model.moe import MoEBlock, RoutedExperts

QUANTIZATIONS = ("int8",)


def check_quantization(quantization: str | None) -> None:
    """ValueError naming the field when `quantization` is not one we serve (None: no quantisation)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)} or None, got {quantization!r}")


def check_checkpoint_quantizable(model_dir: str | Path, quantization: str) -> None:
    """ValueError when the checkpoint is already quantised (its config.json has a `quantization_config`): int8
    weight-only quantisation starts from float32, bfloat16 or float16 weights."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    existing = config.get("quantization_config")
    if existing:
        method = existing.get("quant_method", "unknown") if isinstance(existing, dict) else existing
        raise ValueError(f"quantization={quantization!r}: the checkpoint at {model_dir} is already quantised "
                         f"(quantization_config: {method}); it needs float32, bfloat16 or float16 weights")


class Int8RoutedExperts(nn.Module):
    """A block's routed experts as int8 weights and per-row scales; called as `RoutedExperts` is."""

    adapters = None  # LoRA adapters are served on float experts only

    def __init__(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("w13", w13)  # [E, 2I, H] int8
        self.register_buffer("w13_scale", w13_scale)  # [E, 2I] float32
        self.register_buffer("w2", w2)  # [E, H, I] int8
        self.register_buffer("w2_scale", w2_scale)  # [E, H] float32

    @classmethod
    def from_float(cls, experts: RoutedExperts) -> Int8RoutedExperts:
        w13, s13 = kernels.quantize_int8(experts.w13)
        w2, s2 = kernels.quantize_int8(experts.w2)
        return cls(w13.contiguous(), s13, w2.contiguous(), s2)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return kernels.fused_moe_int8(x, self.w13, self.w13_scale, self.w2, self.w2_scale, topk_weights, topk_ids)


def quantize_model(model: MoECausalLM, quantization: str) -> int:
    """Quantises `model` in place as `quantization` names; returns how many MoE blocks' experts it changed."""
    check_quantization(quantization)
    changed = 0
    for layer in model.model.layers:
        block = layer.mlp
        if isinstance(block, MoEBlock) and isinstance(block.experts, RoutedExperts):
            block.experts = Int8RoutedExperts.from_float(block.experts)
            changed += 1
    return changed
