"""Top-k expert gating, torch reference.

Covers the routers of the supported families with one function:
- Mixtral / Qwen-MoE / OLMoE: softmax, top-k, optional renormalisation.
- DeepSeek-V2: softmax, group-limited greedy (a group scores its best expert), scaling factor.
- DeepSeek-V3: sigmoid, correction bias used only for the choice, groups scored by the sum of
  their two best experts (``noaux_tc``), renormalisation, scaling factor.
"""

import torch

SCORING_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


def check_gating_args(
    router_logits: torch.Tensor,
    top_k: int,
    scoring_func: str,
    correction_bias: torch.Tensor | None,
    n_group: int,
    topk_group: int,
    group_score: str,
) -> None:
    """Raise ``ValueError`` naming the bad argument; shared by the reference and Triton paths."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if correction_bias is not None and correction_bias.shape != (num_experts,):
        raise ValueError(
            f"correction_bias must have shape ({num_experts},), got {tuple(correction_bias.shape)}"
        )
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"n_group={n_group} must divide the number of experts {num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if uses_groups(n_group, topk_group):
        if group_score == "top2_sum" and num_experts // n_group < 2:
            raise ValueError(f"group_score='top2_sum' needs >= 2 experts per group, got {num_experts // n_group}")
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(
                f"top_k={top_k} exceeds the {topk_group * (num_experts // n_group)} experts "
                f"left by topk_group={topk_group} of n_group={n_group}"
            )


def uses_groups(n_group: int, topk_group: int) -> bool:
    return n_group > 1 and topk_group < n_group


def topk_gating_ref(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring_func: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token: ``(weights [T, K] fp32, ids [T, K] int64)``.

    The bias only steers the choice; the weights are always the unbiased scores.
    """
    check_gating_args(router_logits, top_k, scoring_func, correction_bias, n_group, topk_group, group_score)
    logits = router_logits.float()  # [T, E]
    scores = logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if uses_groups(n_group, topk_group):
        choice = _mask_to_best_groups(choice, n_group, topk_group, group_score)
    ids = torch.topk(choice, top_k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


def _mask_to_best_groups(choice: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Set to -inf the experts outside each token's ``topk_group`` best groups."""
    num_tokens, num_experts = choice.shape
    grouped = choice.view(num_tokens, n_group, num_experts // n_group)  # [T, G, E/G]
    if group_score == "max":
        per_group = grouped.amax(dim=-1)  # [T, G]
    else:
        per_group = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    best_groups = per_group.topk(topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(per_group, dtype=torch.bool).scatter_(1, best_groups, True)  # [T, G]
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
