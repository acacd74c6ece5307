"""Fused MoE (grouped SwiGLU experts), torch reference, and the token-sorting helper.

Expert weights are stacked: ``w13 [E, 2I, H]`` holds the gate projection in rows ``:I`` and the
up projection in rows ``I:`` (transformers 5's ``gate_up_proj``), ``w2 [E, H, I]`` the down
projection. For every (token, slot) pair the expert ``e = topk_ids[t, k]`` computes
``w2[e] @ (silu(gate) * up)``; the pairs are weighted by ``topk_weights`` and summed per token.
"""

import torch
import torch.nn.functional as F


def check_fused_moe_args(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the argument whose shape or dtype does not fit the others."""
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got shape {tuple(hidden_states.shape)}")
    num_tokens, hidden = hidden_states.shape
    if w13.dim() != 3 or w13.shape[2] != hidden or w13.shape[1] % 2 != 0:
        raise ValueError(f"w13 must be [E, 2I, H={hidden}], got shape {tuple(w13.shape)}")
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (num_experts, hidden, intermediate):
        raise ValueError(f"w2 must be [E={num_experts}, H={hidden}, I={intermediate}], got shape {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [T={num_tokens}, K], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
        )
    if not (hidden_states.dtype == w13.dtype == w2.dtype):
        raise ValueError(
            f"hidden_states, w13 and w2 must share a dtype, got {hidden_states.dtype}, {w13.dtype}, {w2.dtype}"
        )


def fused_moe_ref(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert output ``[T, H]`` in ``hidden_states.dtype``; differentiable in all float inputs.

    Pairs are sorted by expert so each expert runs two matmuls on one contiguous slice; the
    weighted results are summed per token in fp32 (fp64 for fp64 inputs).
    """
    check_fused_moe_args(hidden_states, w13, w2, topk_weights, topk_ids)
    num_tokens, hidden = hidden_states.shape
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    acc_dtype = torch.promote_types(hidden_states.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    out = torch.zeros(num_tokens, hidden, dtype=acc_dtype, device=hidden_states.device)  # [T, H]
    if topk_ids.numel() == 0:
        return out.to(hidden_states.dtype)

    flat_ids = topk_ids.reshape(-1).long()  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # [T*K] pair indices grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()  # one host sync
    if len(counts) > num_experts:
        raise ValueError(f"topk_ids holds expert ids >= num_experts={num_experts}")
    token_of_pair = order // top_k  # [T*K]
    x_sorted = hidden_states[token_of_pair]  # [T*K, H]

    expert_outputs = []
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        x_e = x_sorted[start : start + count]  # [n, H]
        gate_up = x_e @ w13[expert].t()  # [n, 2I]
        act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]  # [n, I]
        expert_outputs.append(act @ w2[expert].t())  # [n, H]
        start += count
    y = torch.cat(expert_outputs).to(acc_dtype)  # [T*K, H] in sorted order
    y = y * topk_weights.reshape(-1)[order].to(acc_dtype).unsqueeze(-1)
    return out.index_add(0, token_of_pair, y).to(hidden_states.dtype)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_size: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, padding each expert's group to a multiple of ``block_size``.

    Returns, all int32 and without a host sync (sizes are upper bounds, so the launch shape
    depends only on T, K and E):
    - ``sorted_pair_ids [num_blocks * block_size]``: ``t * K + k`` grouped by expert; padding
      slots hold ``T * K`` (one past the last pair).
    - ``block_expert_ids [num_blocks]``: the expert of each block, ``-1`` past the used blocks.
    - ``num_padded [1]``: how many slots of ``sorted_pair_ids`` are used.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = topk_ids.device
    flat_ids = topk_ids.reshape(-1).long()  # [P], P = T*K
    num_pairs = flat_ids.numel()
    # scatter_add_ rather than bincount: CUDA bincount reads max(ids) back to the host to size its
    # output, a sync. Ids must lie in [0, E) (out-of-range ids are an error of the caller).
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))  # [E]
    padded = (counts + block_size - 1) // block_size * block_size  # [E]
    padded_end = padded.cumsum(0)  # [E]

    order = torch.argsort(flat_ids, stable=True)  # [P]
    sorted_experts = flat_ids[order]  # [P]
    rank_in_expert = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    slot = (padded_end - padded)[sorted_experts] + rank_in_expert  # [P]

    # At most min(P, E) experts are used, each wasting fewer than block_size slots.
    max_slots = num_pairs + min(num_pairs, num_experts) * (block_size - 1)
    num_blocks = -(-max_slots // block_size)
    sorted_pair_ids = torch.full((num_blocks * block_size,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, slot, order.int())
    block_starts = torch.arange(num_blocks, device=device) * block_size  # [num_blocks]
    block_expert_ids = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert_ids = torch.where(block_expert_ids < num_experts, block_expert_ids, -1).int()
    num_padded = padded_end[-1:].int() if num_experts > 0 else torch.zeros(1, dtype=torch.int32, device=device)
    return sorted_pair_ids, block_expert_ids, num_padded
