"""Named DeepSeek-V3-shaped model sizes for random-init checkpoints (`expertmesh init-model`).

A preset holds only the dimensions that differ between sizes; `preset_config` spells them out as the
`config.json` of the published DeepSeek-V3 release, so every loader that reads the real checkpoint
reads ours. The `small` shape is frozen: documented benchmark figures refer to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["ModelPreset", "PRESETS", "num_parameters", "preset_config"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ModelPreset:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    first_k_dense_replace: int  # the first k layers have a dense MLP, the rest are MoE
    intermediate_size: int  # dense MLP width
    moe_intermediate_size: int  # width of one routed (and one shared) expert
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    n_shared_experts: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < (0 if field.name == "first_k_dense_replace" else 1):
                raise ValueError(f"ModelPreset.{field.name} must be a positive int, got {value!r}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace} exceeds "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        experts_in_top_groups = self.topk_group * self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > experts_in_top_groups:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {experts_in_top_groups} experts "
                f"in topk_group={self.topk_group} groups"
            )
        if self.max_position_embeddings % 4:
            raise ValueError(
                f"max_position_embeddings={self.max_position_embeddings} must be divisible by 4 (the YaRN factor)"
            )


PRESETS: dict[str, ModelPreset] = {
    # About 2.2M parameters (8.9 MB in float32): a forward pass on a CPU takes milliseconds.
    "tiny": ModelPreset(
        vocab_size=2048, hidden_size=128, num_hidden_layers=4, first_k_dense_replace=1,
        intermediate_size=384, moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, n_shared_experts=1, num_attention_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=2048,
    ),
    # About 342M parameters (1.37 GB in float32). Frozen: benchmarks compare against its figures.
    "small": ModelPreset(
        vocab_size=32000, hidden_size=768, num_hidden_layers=8, first_k_dense_replace=1,
        intermediate_size=2048, moe_intermediate_size=256, n_routed_experts=64, num_experts_per_tok=6,
        n_group=8, topk_group=4, n_shared_experts=2, num_attention_heads=12, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        max_position_embeddings=4096,
    ),
}

# Fixed by our tokenizer files: `<｜begin▁of▁sentence｜>` and `<｜end▁of▁sentence｜>` are trained first.
_BOS_TOKEN_ID = 0
_EOS_TOKEN_ID = 1


def preset_config(name: str, *, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict of preset `name`, in the published DeepSeek-V3 spelling."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "moe_intermediate_size": p.moe_intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_nextn_predict_layers": 0,  # no multi-token-prediction weights are written
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_attention_heads,
        "n_shared_experts": p.n_shared_experts,
        "n_routed_experts": p.n_routed_experts,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": p.kv_lora_rank,
        "q_lora_rank": p.q_lora_rank,
        "qk_rope_head_dim": p.qk_rope_head_dim,
        "v_head_dim": p.v_head_dim,
        "qk_nope_head_dim": p.qk_nope_head_dim,
        "topk_method": "noaux_tc",
        "n_group": p.n_group,
        "topk_group": p.topk_group,
        "num_experts_per_tok": p.num_experts_per_tok,
        "moe_layer_freq": 1,
        "first_k_dense_replace": p.first_k_dense_replace,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": p.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "bos_token_id": _BOS_TOKEN_ID,
        "eos_token_id": _EOS_TOKEN_ID,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": p.max_position_embeddings // 4,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
    }


def num_parameters(config: dict[str, Any]) -> int:
    """Parameter count of a DeepSeek-V3 `config.json` (no MTP layers), from its dimensions alone."""
    c = config
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qk_head_dim = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    attention = (
        hidden * c["q_lora_rank"] + c["q_lora_rank"]  # q_a_proj, q_a_layernorm
        + c["q_lora_rank"] * heads * qk_head_dim  # q_b_proj
        + hidden * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) + c["kv_lora_rank"]  # kv_a_proj_with_mqa, norm
        + c["kv_lora_rank"] * heads * (c["qk_nope_head_dim"] + c["v_head_dim"])  # kv_b_proj
        + heads * c["v_head_dim"] * hidden  # o_proj
        + 2 * hidden  # input_layernorm, post_attention_layernorm
    )
    dense_mlp = 3 * hidden * c["intermediate_size"]
    experts = c["n_routed_experts"] + c["n_shared_experts"]
    moe_mlp = experts * 3 * hidden * c["moe_intermediate_size"] + c["n_routed_experts"] * (hidden + 1)
    n_dense = c["first_k_dense_replace"]
    n_moe = c["num_hidden_layers"] - n_dense
    embeddings = 2 * c["vocab_size"] * hidden + hidden  # embed_tokens, lm_head, final norm
    total = embeddings + c["num_hidden_layers"] * attention + n_dense * dense_mlp + n_moe * moe_mlp
    return total
