"""Model configuration read from a checkpoint's `config.json`, for every supported MoE family.

One frozen dataclass describes all families; `config_families.py` holds a parser per family that maps the
family's `config.json` spellings (the published checkpoints' and transformers 5's) onto it. Runtime state
never lives here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeConfig:
    """Rotary embedding of `dim` channels; YaRN fields are used only when `rope_type == "yarn"`."""

    dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = False  # DeepSeek lays rotary channels out as (x0, x1), (x2, x3), ... pairs

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.dim <= 0 or self.dim % 2:
            raise ValueError(f"rotary dimension must be a positive even number, got {self.dim}")
        if self.theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.theta}")
        if self.rope_type == "yarn" and self.original_max_position_embeddings is None:
            raise ValueError("rope_scaling of type 'yarn' needs original_max_position_embeddings")


@dataclass(frozen=True, kw_only=True, slots=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingConfig:
    """How the gate turns router logits into top-k expert ids and weights (see kernels.topk_gating)."""

    num_experts: int
    top_k: int
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias (aux-loss-free balancing)
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # "max" (V2 group_limited_greedy) | "top2_sum" (V3 noaux_tc)
    renormalize: bool = False
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise ValueError(f"number of routed experts must be positive, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}], got {self.top_k}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide the {self.num_experts} routed experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        if self.group_limited and self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            raise ValueError(
                f"topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts cannot "
                f"hold num_experts_per_tok={self.top_k} experts"
            )
        if self.group_score == "top2_sum" and self.group_limited and self.num_experts // self.n_group < 2:
            raise ValueError("group routing by top-2 sum needs at least 2 experts per group")

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # GQA head size; for MLA, the rotary head size
    mla: MLAConfig | None
    rope: RopeConfig
    rms_norm_eps: float
    max_position_embeddings: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int
    routing: RoutingConfig
    moe_layers: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP
    sliding_windows: tuple[int | None, ...]  # per layer; None means full attention
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(gate(x))
    qkv_bias: bool = False
    o_bias: bool = False
    mla_bias: bool = False  # DeepSeek's attention_bias: q_a_proj, kv_a_proj_with_mqa, o_proj
    qk_norm: str | None = None  # "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    moe_prefix: str = "mlp"  # module name of the MoE block in checkpoints ("block_sparse_moe" for Mixtral)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} must be a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.moe_layers) != self.num_layers or len(self.sliding_windows) != self.num_layers:
            raise ValueError("per-layer settings must have num_hidden_layers entries")
        if self.qk_norm not in (None, "head", "full"):
            raise ValueError(f"qk_norm must be None, 'head' or 'full', got {self.qk_norm!r}")

    @property
    def is_mla(self) -> bool:
        return self.mla is not None

    @property
    def attention_scale(self) -> float:
        """Softmax scale; YaRN's mscale_all_dim enters squared (DeepSeek's long-context correction)."""
        if self.mla is None:
            return self.head_dim**-0.5
        scale = self.mla.qk_head_dim**-0.5
        if self.rope.rope_type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} has no config.json; is it a Hugging Face checkpoint directory?")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        from expertmesh.model.config_families import PARSERS, Raw

        model_type = raw.get("model_type")
        parser = PARSERS.get(model_type)
        if parser is None:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            return parser(Raw(raw))
        except KeyError as e:
            raise ValueError(f"config.json for {model_type} is missing the field {e.args[0]!r}") from None
        except (TypeError, AttributeError) as e:  # a field of the wrong type, e.g. a string for a number
            raise ValueError(f"config.json for {model_type} has a field of the wrong type: {e}") from None


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
