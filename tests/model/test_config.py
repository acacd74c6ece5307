"""config.json parsing: both spellings of every family, derived per-layer settings, clear errors."""

import pytest

from expertmesh.model import SUPPORTED_MODEL_TYPES, ModelConfig

DEEPSEEK_V3_PUBLISHED = {
    "model_type": "deepseek_v3", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
    "moe_intermediate_size": 16, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "first_k_dense_replace": 1, "moe_layer_freq": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "eos_token_id": 1,
}


def test_published_deepseek_v3_spelling():
    c = ModelConfig.from_dict(DEEPSEEK_V3_PUBLISHED)
    r = c.routing
    assert (r.scoring_func, r.correction_bias, r.group_score, r.renormalize) == ("sigmoid", True, "top2_sum", True)
    assert (r.n_group, r.topk_group, r.scaling_factor) == (4, 2, 2.5)
    assert c.rope.rope_type == "yarn" and c.rope.factor == 40 and c.rope.interleave
    # DeepSeek's moe_layer_freq: MoE at layers >= first_k_dense_replace whose index is a multiple of the freq.
    assert c.moe_layers == (False, False, True, False, True, False)
    assert c.is_mla and c.shared_intermediate_size == 16 and c.eos_token_ids == (1,)
    # YaRN's mscale_all_dim scales the softmax: (0.1 * ln 40 + 1)^2 / sqrt(16).
    assert c.attention_scale == pytest.approx((0.1 * 3.6888794541139363 + 1) ** 2 / 4)


def test_transformers5_spelling_equals_published_spelling():
    tf5 = {k: v for k, v in DEEPSEEK_V3_PUBLISHED.items()
           if k not in ("rope_theta", "rope_scaling", "scoring_func", "topk_method", "n_routed_experts")}
    tf5.update(num_local_experts=8, head_dim=8, moe_layer_freq=2, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000, "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    assert ModelConfig.from_dict(tf5) == ModelConfig.from_dict(DEEPSEEK_V3_PUBLISHED)


def test_deepseek_v2_normalises_instead_of_scaling_when_norm_topk_prob_is_set():
    raw = {**DEEPSEEK_V3_PUBLISHED, "model_type": "deepseek_v2", "scoring_func": "softmax",
           "topk_method": "group_limited_greedy", "norm_topk_prob": True, "routed_scaling_factor": 16.0}
    r = ModelConfig.from_dict(raw).routing
    assert (r.scoring_func, r.correction_bias, r.group_score, r.renormalize, r.scaling_factor) == (
        "softmax", False, "max", True, 1.0)
    greedy = ModelConfig.from_dict({**raw, "topk_method": "greedy", "norm_topk_prob": False}).routing
    assert (greedy.n_group, greedy.renormalize, greedy.scaling_factor) == (1, False, 16.0)


def test_qwen2_moe_layers_windows_and_shared_gate():
    raw = {"model_type": "qwen2_moe", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
           "moe_intermediate_size": 8, "shared_expert_intermediate_size": 24, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 6, "num_experts_per_tok": 2,
           "decoder_sparse_step": 2, "mlp_only_layers": [3], "use_sliding_window": True, "sliding_window": 7,
           "max_window_layers": 2, "norm_topk_prob": True}
    c = ModelConfig.from_dict(raw)
    assert c.moe_layers == (False, True, False, False)
    assert c.sliding_windows == (7, None, None, None)  # transformers' rule: odd layer numbers below max_window_layers
    assert c.shared_expert_gate and c.qkv_bias and c.routing.renormalize and c.head_dim == 4
    assert ModelConfig.from_dict({**raw, "use_sliding_window": False}).sliding_windows == (None,) * 4


def test_mixtral_defaults_and_olmoe_qk_norm():
    mixtral = ModelConfig.from_dict({"model_type": "mixtral", "vocab_size": 50, "hidden_size": 16,
                                     "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                                     "sliding_window": 5, "head_dim": None})
    assert mixtral.rope.theta == 1e6 and mixtral.routing.renormalize and mixtral.sliding_windows == (5, 5)
    assert mixtral.moe_prefix == "block_sparse_moe" and mixtral.head_dim == 4
    olmoe = ModelConfig.from_dict({"model_type": "olmoe", "vocab_size": 50, "hidden_size": 16,
                                   "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_experts": 4, "num_experts_per_tok": 2, "clip_qkv": 3.0})
    assert olmoe.qk_norm == "full" and olmoe.clip_qkv == 3.0 and not olmoe.routing.renormalize


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict({"model_type": "llama"})
    for name in SUPPORTED_MODEL_TYPES:
        assert name in str(e.value)


@pytest.mark.parametrize("change,needle", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 1, "n_group": 8, "num_experts_per_tok": 2}, "topk_group"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"topk_method": "random"}, "topk_method"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_invalid_options_name_the_field(change, needle):
    raw = {**DEEPSEEK_V3_PUBLISHED, **change}
    if "topk_group" in change:
        raw["n_routed_experts"] = 8
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_dict(raw)


def test_missing_field_is_named():
    raw = dict(DEEPSEEK_V3_PUBLISHED)
    del raw["kv_lora_rank"]
    with pytest.raises(ValueError, match="kv_lora_rank"):
        ModelConfig.from_dict(raw)
