"""Quantisation of a loaded model, chosen by name (`quantization=...`).

Weights become int8 with one float32 scale per output row (see `kernels/int8_moe.py`): a quarter of float32's
bytes and half of bf16's, which is what a memory-bound decode step reads.
- "int8": every linear layer's weights, as llama.cpp's Q8_0 does: the routed experts (`Int8RoutedExperts`),
  and attention (MLA's `kv_b_proj` too), shared experts, dense layers and the LM head (`Int8Linear`). Kept as
  they are: the embedding (one row a token), the norms and the routers' gates (routing decides which weights run
  at all). Activations stay in the model's dtype and products sum in float32.
- "w8a8": what "int8" quantises, and on the CPU the activations too, in blocks of 32 as llama.cpp's Q8_0 does;
  products sum as integers (`vpdpbusd` on AVX512-VNNI): faster, a little less exact. A layer whose input size
  is not a multiple of 32, and MLA's `kv_b_proj` (read whole by the absorbed decode kernel), keep float
  activations.
- "experts_int8": only the routed experts (vLLM's name for the same choice): most of a MoE's bytes, and the
  weights a token touches least often.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from expertmesh.model.decoder import MoECausalLM
from expertmesh.model.int8_layers import Int8Linear, Int8RoutedExperts
from expertmesh.model.layers import Linear
from expertmesh.model.moe import MoEBlock, RoutedExperts

QUANTIZATIONS = ("int8", "w8a8", "experts_int8")


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


# Linears kept in the checkpoint's dtype: Qwen-MoE's shared-expert gate (a gate: it decides how much of the shared
# experts a token takes).
KEPT_FLOAT = ("shared_expert_gate",)
# MLA's kv_b_proj is read whole by the absorbed decode kernel (as W_UK and W_UV, against float32 queries and
# latents): int8 weights, never quantised activations.
FLOAT_ACTIVATIONS = ("kv_b_proj",)


def _quantize_linears(module: nn.Module, quantize_activations: bool) -> int:
    """Replaces every `Linear` under `module` (but the KEPT_FLOAT ones) with its `Int8Linear`; returns how many.
    The routers' gates are not `Linear`s, and routed experts are quantised as a whole (`Int8RoutedExperts`)."""
    changed = 0
    for name, child in list(module.named_children()):
        if isinstance(child, Linear):
            if name not in KEPT_FLOAT:
                activations = quantize_activations and name not in FLOAT_ACTIVATIONS
                setattr(module, name, Int8Linear.from_float(child, activations))
                changed += 1
        else:
            changed += _quantize_linears(child, quantize_activations)
    return changed


def quantize_model(model: MoECausalLM, quantization: str) -> dict[str, int]:
    """Quantises `model` in place as `quantization` names; returns how many MoE blocks' routed experts and how
    many other linear layers it changed."""
    check_quantization(quantization)
    counts = {"routed_experts": 0, "linears": 0}
    every_linear, activations = quantization in ("int8", "w8a8"), quantization == "w8a8"
    for layer in model.model.layers:
        block = layer.mlp
        if isinstance(block, MoEBlock) and isinstance(block.experts, RoutedExperts):
            block.experts = Int8RoutedExperts.from_float(block.experts, activations)
            counts["routed_experts"] += 1
        if every_linear:  # attention, shared experts, the dense layers' MLP
            counts["linears"] += _quantize_linears(layer, activations)
    if every_linear:
        model.lm_head = Int8Linear.from_float(model.lm_head, activations)
        counts["linears"] += 1
    return counts
