"""Parsers from each family's `config.json` (both spellings) to `ModelConfig`."""

from __future__ import annotations

from typing import Any

from expertmesh.model.config import MLAConfig, ModelConfig, RopeConfig, RoutingConfig

_DEFAULT_THETA = {"mixtral": 1_000_000.0}


class Raw:
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


def _rope(c: Raw, dim: int, *, interleave: bool = False) -> RopeConfig:
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


def _eos(c: Raw) -> tuple[int, ...]:
    eos = c.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(c: Raw) -> dict[str, Any]:
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


def _deepseek(c: Raw) -> ModelConfig:
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


def _gqa_common(c: Raw, *, default_head_dim: int | None = None) -> dict[str, Any]:
    heads = c.req("num_attention_heads")
    head_dim = c.get("head_dim", default=default_head_dim) or c.req("hidden_size") // heads
    return dict(num_kv_heads=c.get("num_key_value_heads", default=heads), head_dim=head_dim, mla=None,
                rope=_rope(c, head_dim))


def _mixtral(c: Raw) -> ModelConfig:
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


def _qwen_moe_layers(c: Raw, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    only_dense = set(c.get("mlp_only_layers", default=[]) or [])
    step = c.get("decoder_sparse_step", default=1)
    return tuple(i not in only_dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


def _qwen_windows(c: Raw, num_layers: int, v2: bool) -> tuple[int | None, ...]:
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


def _qwen(c: Raw) -> ModelConfig:
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


def _olmoe(c: Raw) -> ModelConfig:
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


PARSERS = {
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen,
    "qwen3_moe": _qwen,
    "olmoe": _olmoe,
}
