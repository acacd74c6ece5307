"""Model configuration read from a checkpoint's `config.json`, for every supported MoE family.

One frozen dataclass describes all families; a parser per family maps the family's `config.json`
spellings (the published checkpoints' and transformers 5's) onto it. Runtime state never lives here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
_DEFAULT_THETA = {"mixtral": 1_000_000.0}


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
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        parser = _PARSERS.get(model_type)
        if parser is None:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            return parser(_Raw(raw))
        except KeyError as e:
            raise ValueError(f"config.json for {model_type} is missing the field {e.args[0]!r}") from None


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class _Raw:
    """config.json with first-of-several-spellings lookup."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw

    def get(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if self.raw.get(name) is not None:
                return self.raw[name]
        return default

    def req(self, *names: str) -> Any:
        value = self.get(*names)
        if value is None:
            raise KeyError(names[0])
        return value


def _rope(c: _Raw, dim: int, *, interleave: bool = False) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); published checkpoints write
    # top-level `rope_theta` plus `rope_scaling` with `type` (or `rope_type`).
    params = dict(c.get("rope_parameters", default={}) or {})
    scaling = c.get("rope_scaling")
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = params.get("rope_theta", c.get("rope_theta", default=_DEFAULT_THETA.get(c.get("model_type"), 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    max_pos = c.get("max_position_embeddings", default=4096)
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings")
    if rope_type == "yarn":
        original = original or max_pos
        factor = factor if factor is not None else max_pos / original
    return RopeConfig(
        dim=dim,
        theta=float(theta),
        rope_type=rope_type,
        factor=float(factor) if factor is not None else 1.0,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleave=interleave,
    )


def _eos(c: _Raw) -> tuple[int, ...]:
    eos = c.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(c: _Raw) -> dict[str, Any]:
    act = c.get("hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported; MoE families here use 'silu'")
    return dict(
        model_type=c.raw["model_type"],
        vocab_size=c.req("vocab_size"),
        hidden_size=c.req("hidden_size"),
        num_layers=c.req("num_hidden_layers"),
        num_heads=c.req("num_attention_heads"),
        rms_norm_eps=float(c.get("rms_norm_eps", default=1e-6)),
        max_position_embeddings=c.get("max_position_embeddings", default=4096),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", default=False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos(c),
    )


def _deepseek(c: _Raw) -> ModelConfig:
    v3 = c.raw["model_type"] == "deepseek_v3"
    mla = MLAConfig(
        q_lora_rank=c.get("q_lora_rank"),
        kv_lora_rank=c.req("kv_lora_rank"),
        qk_nope_head_dim=c.req("qk_nope_head_dim"),
        qk_rope_head_dim=c.req("qk_rope_head_dim"),
        v_head_dim=c.req("v_head_dim"),
    )
    num_layers = c.req("num_hidden_layers")
    num_experts = c.req("n_routed_experts", "num_local_experts", "num_experts")
    # V3's published config says scoring_func "sigmoid" + topk_method "noaux_tc"; transformers 5 drops both
    # spellings and hard-codes them, so the family decides the default.
    scoring = c.get("scoring_func", default="sigmoid" if v3 else "softmax")
    method = c.get("topk_method", default="noaux_tc" if v3 else "greedy")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ValueError(f"topk_method {method!r} is not supported; use greedy, group_limited_greedy or noaux_tc")
    top_k = c.req("num_experts_per_tok")
    norm = bool(c.get("norm_topk_prob", default=v3))
    scaling = float(c.get("routed_scaling_factor", default=1.0))
    if not v3 and norm and top_k > 1:
        scaling = 1.0  # DeepSeek-V2 normalises instead of scaling when norm_topk_prob is set
    grouped = method != "greedy"
    routing = RoutingConfig(
        num_experts=num_experts,
        top_k=top_k,
        scoring_func=scoring,
        correction_bias=method == "noaux_tc",
        n_group=c.get("n_group", default=1) if grouped else 1,
        topk_group=c.get("topk_group", default=1) if grouped else 1,
        group_score="top2_sum" if method == "noaux_tc" else "max",
        renormalize=norm and top_k > 1,
        scaling_factor=scaling,
    )
    first_dense = c.get("first_k_dense_replace", default=0)
    freq = c.get("moe_layer_freq", default=1)
    n_shared = c.get("n_shared_experts", default=0) or 0
    moe_inter = c.req("moe_intermediate_size")
    return ModelConfig(
        **_common(c),
        num_kv_heads=c.req("num_attention_heads"),
        head_dim=mla.qk_rope_head_dim,
        mla=mla,
        # V2 always rotates interleaved pairs; V3 does unless rope_interleave is false.
        rope=_rope(c, mla.qk_rope_head_dim, interleave=bool(c.get("rope_interleave", default=True)) if v3 else True),
        intermediate_size=c.req("intermediate_size"),
        moe_intermediate_size=moe_inter,
        routing=routing,
        moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(num_layers)),
        sliding_windows=(None,) * num_layers,
        shared_intermediate_size=moe_inter * n_shared,
        mla_bias=bool(c.get("attention_bias", default=False)),
    )


def _gqa_common(c: _Raw, *, default_head_dim: int | None = None) -> dict[str, Any]:
    heads = c.req("num_attention_heads")
    head_dim = c.get("head_dim", default=default_head_dim) or c.req("hidden_size") // heads
    return dict(num_kv_heads=c.get("num_key_value_heads", default=heads), head_dim=head_dim, mla=None,
                rope=_rope(c, head_dim))


def _mixtral(c: _Raw) -> ModelConfig:
    num_layers = c.req("num_hidden_layers")
    window = c.get("sliding_window")
    inter = c.req("intermediate_size")
    return ModelConfig(
        **_common(c),
        **_gqa_common(c),
        intermediate_size=inter,
        moe_intermediate_size=inter,
        routing=RoutingConfig(num_experts=c.req("num_local_experts", "num_experts"),
                              top_k=c.req("num_experts_per_tok"), renormalize=True),
        moe_layers=(True,) * num_layers,
        sliding_windows=(window or None,) * num_layers,
        moe_prefix="block_sparse_moe",
    )


def _qwen_moe_layers(c: _Raw, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    only_dense = set(c.get("mlp_only_layers", default=[]) or [])
    step = c.get("decoder_sparse_step", default=1)
    return tuple(i not in only_dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


def _qwen_windows(c: _Raw, num_layers: int, v2: bool) -> tuple[int | None, ...]:
    if not c.get("use_sliding_window", default=False) or not c.get("sliding_window"):
        return (None,) * num_layers
    window = c.get("sliding_window")
    layer_types = c.get("layer_types")
    if layer_types is None and v2:
        max_window = c.get("max_window_layers", default=num_layers)
        layer_types = ["sliding_attention" if (i + 1) % 2 and i < max_window else "full_attention"
                       for i in range(num_layers)]
    if layer_types is None:
        return (window,) * num_layers
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _qwen(c: _Raw) -> ModelConfig:
    v2 = c.raw["model_type"] == "qwen2_moe"
    num_layers = c.req("num_hidden_layers")
    num_experts = c.req("num_experts", "num_local_experts")
    shared = (c.get("shared_expert_intermediate_size", default=0) or 0) if v2 else 0
    return ModelConfig(
        **_common(c),
        **_gqa_common(c),
        intermediate_size=c.req("intermediate_size"),
        moe_intermediate_size=c.req("moe_intermediate_size"),
        routing=RoutingConfig(num_experts=num_experts, top_k=c.req("num_experts_per_tok"),
                              renormalize=bool(c.get("norm_topk_prob", default=False))),
        moe_layers=_qwen_moe_layers(c, num_layers, num_experts),
        sliding_windows=_qwen_windows(c, num_layers, v2),
        shared_intermediate_size=shared,
        shared_expert_gate=shared > 0,
        qkv_bias=bool(c.get("qkv_bias", default=True)) if v2 else bool(c.get("attention_bias", default=False)),
        o_bias=False if v2 else bool(c.get("attention_bias", default=False)),
        qk_norm=None if v2 else "head",
    )


def _olmoe(c: _Raw) -> ModelConfig:
    num_layers = c.req("num_hidden_layers")
    bias = bool(c.get("attention_bias", default=False))
    return ModelConfig(
        **_common(c),
        **_gqa_common(c),
        intermediate_size=c.req("intermediate_size"),
        moe_intermediate_size=c.req("intermediate_size"),
        routing=RoutingConfig(num_experts=c.req("num_experts", "num_local_experts"),
                              top_k=c.req("num_experts_per_tok"),
                              renormalize=bool(c.get("norm_topk_prob", default=False))),
        moe_layers=(True,) * num_layers,
        sliding_windows=(None,) * num_layers,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=c.get("clip_qkv"),
    )


_PARSERS = {
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen,
    "qwen3_moe": _qwen,
    "olmoe": _olmoe,
}
