"""Tensor ops of expertmesh: each has a torch reference (``*_ref``) and a Triton kernel
(``*_triton``) with the same signature; the plain names dispatch between them (see
``registry``)."""

from .fused_moe import fused_moe_ref, moe_align_block_size
from .gating import topk_gating_ref
from .gqa_decode import gqa_decode_ref
from .int8_linear import linear_int8, linear_int8_ref
from .int8_moe import Q8_BLOCK, dequantize_int8, fused_moe_int8_ref, quantize_activations_q8, quantize_int8
from .lora import expert_lora_rows, fused_moe_lora_ref, lora_expand_ref, lora_shrink_ref
from .mla_absorbed import mla_decode_absorbed_ref, mla_decode_step_ref
from .mla_decode import mla_decode_attention_ref
from .registry import (
    BACKEND_ENV,
    fused_moe,
    fused_moe_lora,
    fused_moe_int8,
    fused_moe_lora_triton,
    fused_moe_mixed,
    fused_moe_triton,
    gqa_decode,
    kernel_backend,
    linear_mixed,
    lora_expand,
    lora_expand_triton,
    lora_shrink,
    lora_shrink_triton,
    mla_decode_absorbed,
    mla_decode_step,
    mla_decode_attention,
    mla_decode_attention_triton,
    rms_norm,
    rms_norm_triton,
    topk_gating,
    topk_gating_triton,
    triton_available,
    use_triton,
)
from .rms_norm import rms_norm_ref

__all__ = [
    "BACKEND_ENV",
    "expert_lora_rows",
    "fused_moe",
    "fused_moe_ref",
    "fused_moe_int8",
    "fused_moe_mixed",
    "linear_mixed",
    "fused_moe_int8_ref",
    "dequantize_int8",
    "quantize_int8",
    "quantize_activations_q8",
    "Q8_BLOCK",
    "linear_int8",
    "linear_int8_ref",
    "fused_moe_lora",
    "fused_moe_lora_ref",
    "fused_moe_lora_triton",
    "fused_moe_triton",
    "gqa_decode",
    "gqa_decode_ref",
    "kernel_backend",
    "lora_expand",
    "lora_expand_ref",
    "lora_expand_triton",
    "lora_shrink",
    "lora_shrink_ref",
    "lora_shrink_triton",
    "mla_decode_absorbed",
    "mla_decode_absorbed_ref",
    "mla_decode_step",
    "mla_decode_step_ref",
    "mla_decode_attention",
    "mla_decode_attention_ref",
    "mla_decode_attention_triton",
    "moe_align_block_size",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_triton",
    "topk_gating",
    "topk_gating_ref",
    "topk_gating_triton",
    "triton_available",
    "use_triton",
]
