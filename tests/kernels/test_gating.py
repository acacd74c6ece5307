import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config, MixtralConfig, Qwen2MoeConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from expertmesh.kernels import topk_gating_ref, topk_gating_triton

from .conftest import DEVICE

# (num_experts, top_k, options): every scoring / grouping / normalisation path.
CASES = {
    "softmax": (7, 2, {}),
    "softmax_renorm_k1": (8, 1, {"renormalize": True}),
    "softmax_group_max": (16, 3, {"n_group": 4, "topk_group": 2, "scaling_factor": 16.0}),
    "sigmoid_bias_top2_sum": (
        16,
        4,
        {"scoring_func": "sigmoid", "n_group": 4, "topk_group": 2, "group_score": "top2_sum", "renormalize": True,
         "scaling_factor": 2.5, "correction_bias": "random"},
    ),  # fmt: skip
    "sigmoid_odd_groups": (
        15,
        3,
        {"scoring_func": "sigmoid", "n_group": 5, "topk_group": 1, "group_score": "top2_sum",
         "correction_bias": "random"},  # fmt: skip
    ),
    "all_groups_kept": (12, 3, {"n_group": 4, "topk_group": 4, "renormalize": True}),
}


def _options(num_experts, options, device="cpu"):
    options = dict(options)
    if options.get("correction_bias") == "random":
        options["correction_bias"] = 0.1 * torch.randn(num_experts, device=device)
    return options


def naive_gating(logits, top_k, *, scoring_func="softmax", correction_bias=None, n_group=1, topk_group=1,
                 group_score="max", renormalize=False, scaling_factor=1.0):  # fmt: skip
    """The definition, one token at a time with Python sorting."""
    num_tokens, num_experts = logits.shape
    all_weights, all_ids = [], []
    for t in range(num_tokens):
        scores = logits[t].softmax(-1) if scoring_func == "softmax" else logits[t].sigmoid()
        choice = (scores if correction_bias is None else scores + correction_bias).tolist()
        allowed = list(range(num_experts))
        if n_group > 1 and topk_group < n_group:
            size = num_experts // n_group

            def group_value(g):
                best = sorted(choice[g * size : (g + 1) * size], reverse=True)
                return best[0] if group_score == "max" else best[0] + best[1]

            groups = sorted(range(n_group), key=group_value, reverse=True)[:topk_group]
            allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        ids = sorted(allowed, key=lambda e: choice[e], reverse=True)[:top_k]
        weights = [scores[e].item() for e in ids]
        if renormalize:
            weights = [w / (sum(weights) + 1e-20) for w in weights]
        all_weights.append([w * scaling_factor for w in weights])
        all_ids.append(ids)
    return (
        torch.tensor(all_weights, dtype=torch.float32).view(num_tokens, top_k),
        torch.tensor(all_ids, dtype=torch.int64).view(num_tokens, top_k),
    )


def assert_same_routing(actual, expected, rtol=1e-5, atol=1e-6):
    """Same expert set per token, same weight per expert (the order of the K slots is free)."""
    (w_a, ids_a), (w_e, ids_e) = actual, expected
    assert ids_a.dtype == torch.int64 and w_a.dtype == torch.float32
    assert ids_a.shape == ids_e.shape
    ids_a, order_a = ids_a.cpu().sort(dim=-1)
    ids_e, order_e = ids_e.cpu().sort(dim=-1)
    torch.testing.assert_close(ids_a, ids_e, rtol=0, atol=0)
    torch.testing.assert_close(w_a.cpu().gather(1, order_a), w_e.cpu().float().gather(1, order_e), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_tokens", [0, 1, 3, 17])
def test_ref_matches_naive_per_token_loop(case, num_tokens):
    num_experts, top_k, options = CASES[case]
    options = _options(num_experts, options)
    logits = torch.randn(num_tokens, num_experts)
    assert_same_routing(topk_gating_ref(logits, top_k, **options), naive_gating(logits, top_k, **options))


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_tokens", [0, 1, 17])
def test_triton_matches_ref(case, num_tokens):
    num_experts, top_k, options = CASES[case]
    options = _options(num_experts, options, DEVICE)
    logits = 2 * torch.randn(num_tokens, num_experts, device=DEVICE)
    assert_same_routing(topk_gating_triton(logits, top_k, **options), topk_gating_ref(logits, top_k, **options))


@pytest.mark.usefixtures("needs_triton")
def test_triton_handles_deepseek_v3_width():
    logits = torch.randn(3, 256, device=DEVICE)
    options = {"scoring_func": "sigmoid", "correction_bias": 0.1 * torch.randn(256, device=DEVICE), "n_group": 8,
               "topk_group": 4, "group_score": "top2_sum", "renormalize": True, "scaling_factor": 2.5}  # fmt: skip
    assert_same_routing(topk_gating_triton(logits, 8, **options), topk_gating_ref(logits, 8, **options))


def _routed(router, hidden_size=32, num_tokens=17):
    with torch.no_grad():
        router.weight.normal_()
        return router(torch.randn(num_tokens, hidden_size))


def test_ref_matches_deepseek_v3_router():
    config = DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                              norm_topk_prob=True, routed_scaling_factor=2.5)  # fmt: skip
    router = DeepseekV3TopkRouter(config)
    router.e_score_correction_bias.normal_(std=0.1)
    logits, weights, ids = _routed(router)
    ours = topk_gating_ref(
        logits, 4, scoring_func="sigmoid", correction_bias=router.e_score_correction_bias, n_group=4,
        topk_group=2, group_score="top2_sum", renormalize=True, scaling_factor=2.5,
    )  # fmt: skip
    assert_same_routing(ours, (weights, ids))


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_ref_matches_deepseek_v2_router(topk_method):
    config = DeepseekV2Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                              topk_method=topk_method, routed_scaling_factor=16.0)  # fmt: skip
    logits, weights, ids = _routed(DeepseekV2TopkRouter(config))
    groups = {"n_group": 4, "topk_group": 2} if topk_method == "group_limited_greedy" else {}
    assert_same_routing(topk_gating_ref(logits, 3, scaling_factor=16.0, **groups), (weights, ids))


def test_ref_matches_mixtral_router():
    config = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    logits, weights, ids = _routed(MixtralTopKRouter(config))
    assert_same_routing(topk_gating_ref(logits, 2, renormalize=True), (weights, ids))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_ref_matches_qwen2_moe_router(norm_topk_prob):
    config = Qwen2MoeConfig(hidden_size=32, num_experts=7, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob)
    logits, weights, ids = _routed(Qwen2MoeTopKRouter(config))
    assert_same_routing(topk_gating_ref(logits, 3, renormalize=norm_topk_prob), (weights, ids))


@pytest.mark.parametrize(
    "top_k,options,message",
    [
        (2, {"scoring_func": "relu"}, "scoring_func"),
        (2, {"group_score": "mean"}, "group_score"),
        (9, {}, "top_k"),
        (2, {"n_group": 3}, "n_group"),
        (2, {"n_group": 4, "topk_group": 5}, "topk_group"),
        (5, {"n_group": 4, "topk_group": 2}, "top_k"),
        (2, {"correction_bias": torch.zeros(7)}, "correction_bias"),
    ],
)
def test_ref_rejects_bad_arguments(top_k, options, message):
    with pytest.raises(ValueError, match=message):
        topk_gating_ref(torch.randn(2, 8), top_k, **options)
