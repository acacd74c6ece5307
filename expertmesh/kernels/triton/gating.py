"""Top-k gating Triton kernel: one program per token.

The token's E scores are held as a [groups, experts per group] tile, so group scores are row
reductions. Selection is K rounds of arg-max (K and topk_group are small), lowest index first
on ties.
"""

import torch
import triton
import triton.language as tl

from ..gating import check_gating_args, uses_groups


@triton.jit
def _argmax_2d(values, index):
    """Index (from ``index``) of the largest entry of a 2D tile, the lowest on ties."""
    best = tl.max(tl.max(values, axis=1), axis=0)
    return tl.min(tl.min(tl.where(values == best, index, 2**30), axis=1), axis=0)


@triton.jit
def _topk_gating_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    stride_logits, stride_weights, stride_ids, scaling_factor,
    TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, USE_GROUPS: tl.constexpr,
    GROUP_TOP2_SUM: tl.constexpr, RENORMALIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    group = tl.arange(0, BLOCK_G)  # [G]
    member = tl.arange(0, BLOCK_S)  # [S]
    expert = group[:, None] * GROUP_SIZE + member[None, :]  # [G, S]
    real = (group[:, None] < N_GROUP) & (member[None, :] < GROUP_SIZE)

    logits = tl.load(logits_ptr + token * stride_logits + expert, mask=real, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        exps = tl.exp(logits - tl.max(tl.max(logits, axis=1), axis=0))  # padding: exp(-inf) = 0
        scores = exps / tl.sum(tl.sum(exps, axis=1), axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + expert, mask=real, other=0.0).to(tl.float32)
    choice = tl.where(real, choice, float("-inf"))

    if USE_GROUPS:
        group_score = tl.max(choice, axis=1)  # [G]
        if GROUP_TOP2_SUM:
            first = tl.min(tl.where(choice == group_score[:, None], member[None, :], BLOCK_S), axis=1)
            second = tl.max(tl.where(member[None, :] == first[:, None], float("-inf"), choice), axis=1)
            group_score = group_score + second
        group_score = tl.where(group < N_GROUP, group_score, float("-inf"))
        keep = group < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(group_score, axis=0)
            picked = tl.min(tl.where(group_score == best, group, BLOCK_G), axis=0)
            keep = keep | (group == picked)
            group_score = tl.where(group == picked, float("-inf"), group_score)
        choice = tl.where(keep[:, None], choice, float("-inf"))

    slot = tl.arange(0, BLOCK_K)
    top_weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    for k in tl.static_range(TOP_K):
        picked = _argmax_2d(choice, expert)
        weight = tl.sum(tl.sum(tl.where(expert == picked, scores, 0.0), axis=1), axis=0)
        top_weights = tl.where(slot == k, weight, top_weights)
        top_ids = tl.where(slot == k, picked.to(tl.int64), top_ids)
        choice = tl.where(expert == picked, float("-inf"), choice)
    if RENORMALIZE:
        top_weights = top_weights / (tl.sum(top_weights, axis=0) + 1e-20)
    top_weights = top_weights * scaling_factor
    tl.store(weights_ptr + token * stride_weights + slot, top_weights, mask=slot < TOP_K)
    tl.store(ids_ptr + token * stride_ids + slot, top_ids, mask=slot < TOP_K)


def topk_gating_triton(
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
    """Same contract as ``topk_gating_ref``; ids come out best first."""
    check_gating_args(router_logits, top_k, scoring_func, correction_bias, n_group, topk_group, group_score)
    num_tokens, num_experts = router_logits.shape
    grouped = uses_groups(n_group, topk_group)
    tile_groups = n_group if grouped else 1  # without group limits the tile is one row of E
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    bias = correction_bias.contiguous() if correction_bias is not None else logits  # dummy pointer
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    _topk_gating_kernel[(num_tokens,)](
        logits, bias, weights, ids,
        logits.stride(0), weights.stride(0), ids.stride(0), float(scaling_factor),
        TOP_K=top_k, N_GROUP=tile_groups, TOPK_GROUP=topk_group, GROUP_SIZE=num_experts // tile_groups,
        BLOCK_G=triton.next_power_of_2(tile_groups), BLOCK_S=triton.next_power_of_2(num_experts // tile_groups),
        BLOCK_K=triton.next_power_of_2(top_k),
        SIGMOID=scoring_func == "sigmoid", HAS_BIAS=correction_bias is not None, USE_GROUPS=grouped,
        GROUP_TOP2_SUM=group_score == "top2_sum", RENORMALIZE=renormalize,
    )  # fmt: skip
    return weights, ids
