"""Model code: configs read from checkpoints, MLA/GQA attention, the MoE block, loading."""

from expertmesh.model.attention_metadata import AttentionMetadata
from expertmesh.model.checkpoint_check import check_checkpoint
from expertmesh.model.config import SUPPORTED_MODEL_TYPES, ModelConfig
from expertmesh.model.decoder import MoECausalLM
from expertmesh.model.loader import LayerExperts, LayerGate, load_experts, load_gates, load_model, resolve_dtype

__all__ = [
    "AttentionMetadata", "LayerExperts", "LayerGate", "ModelConfig", "MoECausalLM", "SUPPORTED_MODEL_TYPES",
    "check_checkpoint", "load_experts", "load_gates", "load_model", "resolve_dtype",
]
