"""Fused MoE for CPU inference: only the experts that received tokens.

Same signature and result as `fused_moe_ref`. The reference is written for autograd; this path is for
serving, with no gradients. At decode sizes (float32, up to `SMALL_M_MAX_PAIRS` routed pairs) it runs the C++
kernel of `csrc/small_m.cpp`, which streams every selected expert of the layer in one parallel region;
otherwise, and where that kernel cannot be built, each expert runs as two linears (`cpu_linear.linear`)
over its sorted tokens, accumulated into one float32 buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_ext import small_m_kernels
from .cpu_linear import linear

# Past this many (token, expert) pairs the per-expert GEMMs are large enough for BLAS to win: measured as 64
# tokens at top-6 on the `small` preset. Counted in pairs, since that is the kernel's work, so an expert
# shard's requests (one pair per row, top-1) take the same path as the whole layer would.
SMALL_M_MAX_PAIRS = 64 * 6


def _swiglu(gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
    gate = F.silu(gate_up[:, :intermediate])
    return gate.mul_(gate_up[:, intermediate:])  # [n, I]


@torch.no_grad()
def fused_moe_cpu(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K]
) -> torch.Tensor:
    num_tokens, hidden = hidden_states.shape
    num_experts, intermediate = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1] if topk_ids.dim() == 2 else 0
    if num_tokens == 0 or top_k == 0:
        return hidden_states.new_zeros(num_tokens, hidden)
    if hidden_states.dtype in (torch.float32, torch.bfloat16) and num_tokens * top_k <= SMALL_M_MAX_PAIRS:
        kernels = small_m_kernels()
        if kernels is not None and w13.is_contiguous() and w2.is_contiguous():
            # bf16 weights are read as they are, the activations and every sum in float32
            out = kernels.moe_small_m(hidden_states.float().contiguous(), w13, w2, topk_weights.float(), topk_ids)
            return out.to(hidden_states.dtype)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    if num_tokens == 1:  # decode at batch 1: K experts, no sorting
        x = hidden_states
        for expert, weight in zip(topk_ids[0].tolist(), topk_weights[0].tolist()):
            y = linear(_swiglu(linear(x, w13[expert]), intermediate), w2[expert])  # [1, H]
            out.add_(y, alpha=weight)
        return out.to(hidden_states.dtype)

    flat_ids = topk_ids.reshape(-1).long()  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of_pair = order // top_k  # [T*K]
    x_sorted = hidden_states[token_of_pair]  # [T*K, H]
    pair_weights = topk_weights.reshape(-1)[order].float().unsqueeze(-1)  # [T*K, 1]
    y_sorted = torch.empty(flat_ids.numel(), hidden, dtype=torch.float32)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        act = _swiglu(linear(x_sorted[rows], w13[expert]), intermediate)  # [n, I]
        y_sorted[rows] = linear(act, w2[expert])  # [n, H]
        start += count
    y_sorted.mul_(pair_weights)
    return out.index_add_(0, token_of_pair, y_sorted).to(hidden_states.dtype)
