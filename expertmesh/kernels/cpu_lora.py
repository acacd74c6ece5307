"""Multi-adapter LoRA for CPU inference: the C++ kernels of `csrc/lora.cpp` and the LoRA hook of
`csrc/small_m.cpp`'s routed experts.

Same signatures and results as the references of `lora.py`, for serving (no gradients). Float32 runs the
compiled kernels; other dtypes, and machines where they cannot be built, the references. At batch-32 decode on
`small` (bench/lora_serving.py; figures in bench/RESULTS.md, "LoRA serving (issue 16)"), an adapted linear layer costs
~45-65 us here against ~95-270 us for a torch loop over 4-16 adapter slots and ~200-220 us for the reference's
per-row gather of A and B. The routed experts' updates run inside the fused kernel, right after it streams the
experts' weights: an adapted (token, expert) pair costs FMAs on adapter rows that sit in L2, and no second pass
over its expert's weights (which running adapted pairs apart costs: +31% on an MoE layer with 4-16 expert-aware
adapters, against -1% to +2% here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_ext import small_m_kernels
from .cpu_fused_moe import SMALL_M_MAX_PAIRS
from .cpu_linear import linear
from .lora import lora_expand_ref, lora_shrink_ref


def _kernels(*tensors: torch.Tensor):
    """The compiled kernels when every float tensor is float32, else None."""
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        return None
    return small_m_kernels()


@torch.no_grad()
def lora_shrink_cpu(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    kernels = _kernels(x, a)
    if kernels is None:
        return lora_shrink_ref(x, a, rows)
    return kernels.lora_shrink_f32(x.contiguous(), a.contiguous(), rows.long().contiguous())  # [T, r]


@torch.no_grad()
def lora_expand_cpu(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    kernels = _kernels(y, h, b)
    if kernels is None or y.stride(-1) != 1:
        return lora_expand_ref(y, h, b, rows)
    return kernels.lora_expand_f32(y, h.contiguous(), b, rows.long().contiguous())  # y, updated in place


@torch.no_grad()
def fused_moe_lora_cpu(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
    lora_rows: torch.Tensor,  # [T, K]
    a13: torch.Tensor,
    b13: torch.Tensor,
    a2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    num_tokens, hidden = hidden_states.shape
    num_experts, intermediate = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    if num_tokens == 0 or top_k == 0:
        return hidden_states.new_zeros(num_tokens, hidden)
    if num_tokens * top_k <= SMALL_M_MAX_PAIRS and w13.is_contiguous() and w2.is_contiguous():
        kernels = _kernels(hidden_states, w13, w2, a13, b13, a2, b2)
        if kernels is not None:
            return kernels.moe_lora_small_m(hidden_states.contiguous(), w13, w2, topk_weights, topk_ids, lora_rows,
                                            a13.contiguous(), b13, a2.contiguous(), b2)

    # Prefill sizes: each expert's two linears over its sorted pairs, the pairs' updates over all of them at once.
    flat_ids = topk_ids.reshape(-1).long()  # [P]
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of_pair = order // top_k  # [P]
    rows = lora_rows.reshape(-1)[order]  # [P]
    x = hidden_states[token_of_pair]  # [P, H]

    def per_expert(inp: torch.Tensor, w: torch.Tensor, out_features: int) -> torch.Tensor:
        out = torch.empty(inp.shape[0], out_features, dtype=torch.float32)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                out[start : start + count] = linear(inp[start : start + count], w[expert])
                start += count
        return out

    gate_up = lora_expand_cpu(per_expert(x, w13, 2 * intermediate), lora_shrink_cpu(x, a13, rows), b13, rows)
    act = (F.silu(gate_up[:, :intermediate]).mul_(gate_up[:, intermediate:])).to(hidden_states.dtype)  # [P, I]
    y = lora_expand_cpu(per_expert(act, w2, hidden), lora_shrink_cpu(act, a2, rows), b2, rows)  # [P, H]
    y.mul_(topk_weights.reshape(-1)[order].float().unsqueeze(1))
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    return out.index_add_(0, token_of_pair, y).to(hidden_states.dtype)
