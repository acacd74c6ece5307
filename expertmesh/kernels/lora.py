"""Multi-adapter LoRA, as Punica and S-LoRA batch it: every row of a batch picks its own adapter.

Adapters sit in stacks indexed by row: A [N, r, in] and B [N, out, r], the scaling folded into B and zeros
past an adapter's rank. A row's index -1 means no adapter.

- `lora_shrink(x [T, in], a, rows [T]) -> h [T, r]`: h[t] = A[rows[t]] x[t] (zeros where rows[t] = -1);
- `lora_expand(y [T, out], h, b, rows [T]) -> y`: y[t] += B[rows[t]] h[t] in place where rows[t] >= 0; other
  rows of y are not written.
Linear layers call them with each token's adapter slot as its row.

Routed experts adapt (slot, expert) pairs: `expert_lora_rows(index [S, E], token_slots [T], topk_ids [T, K])`
names each (token, expert) pair's row of the expert stacks A13 [N, r, H], B13 [N, 2I, r], A2 [N, r, I],
B2 [N, H, r]. `fused_moe_lora` is `fused_moe` where a pair with a row >= 0 gains x A13^T B13^T on its gate/up
projection before the activation and act A2^T B2^T on its down projection, before the routing weight.
The intermediate h is float32 (float64 for float64 inputs); B h is computed in that precision and added to y in
y's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_moe import check_fused_moe_args


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for gradcheck


def check_lora_args(x: torch.Tensor, stack: torch.Tensor, rows: torch.Tensor, *, side: str) -> None:
    """`side` "a": x [T, in] against A [N, r, in]; "b": y [T, out] against B [N, out, r]."""
    if x.dim() != 2:
        raise ValueError(f"{'x' if side == 'a' else 'y'} must be [T, features], got shape {tuple(x.shape)}")
    if stack.dim() != 3 or stack.shape[2 if side == "a" else 1] != x.shape[1]:
        want = f"[N, r, in={x.shape[1]}]" if side == "a" else f"[N, out={x.shape[1]}, r]"
        raise ValueError(f"{side} must be {want}, got shape {tuple(stack.shape)}")
    if rows.shape != (x.shape[0],) or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be int32/int64 [T={x.shape[0]}], got {rows.dtype} {tuple(rows.shape)}")


def check_expand_args(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> None:
    check_lora_args(y, b, rows, side="b")
    if h.shape != (y.shape[0], b.shape[2]):
        raise ValueError(f"h must be [T={y.shape[0]}, r={b.shape[2]}], got shape {tuple(h.shape)}")


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h [T, r] = A[rows[t]] x[t], zero where rows[t] < 0; float32 (float64 for float64). Differentiable."""
    check_lora_args(x, a, rows, side="a")
    acc = acc_dtype(x.dtype)
    live = rows >= 0  # [T]
    per_row = a.to(acc)[rows.clamp(min=0).long()]  # [T, r, in] each row's A
    h = torch.bmm(per_row, x.to(acc).unsqueeze(2)).squeeze(2)  # [T, r]
    return h.masked_fill(~live.unsqueeze(1), 0.0)


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """y[t] += B[rows[t]] h[t] in place for rows[t] >= 0, the others untouched; returns y. Differentiable
    (autograd records the in-place add)."""
    check_expand_args(y, h, b, rows)
    live = (rows >= 0).nonzero().squeeze(1)  # [n]
    if live.numel() == 0:
        return y
    live_rows = rows[live].long()
    delta = torch.bmm(b.to(h.dtype)[live_rows], h[live].unsqueeze(2)).squeeze(2)  # [n, out]
    return y.index_add_(0, live, delta.to(y.dtype))


def expert_lora_rows(index: torch.Tensor, token_slots: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[T, K] int64: the stack row of each (token, expert) pair, index[slot, expert], -1 where the token has
    no slot (-1) or its slot does not adapt that expert."""
    rows = index[token_slots.clamp(min=0)].gather(1, topk_ids.long())  # [T, K]
    return rows.masked_fill_((token_slots < 0).unsqueeze(1), -1)


def check_fused_moe_lora_args(hidden_states, w13, w2, topk_weights, topk_ids, lora_rows, a13, b13, a2, b2) -> None:
    """`check_fused_moe_args`, and stacks A13 [N, r, H], B13 [N, 2I, r], A2 [N, r, I], B2 [N, H, r] (N and r
    read from A13) and lora_rows of the routing's shape."""
    check_fused_moe_args(hidden_states, w13, w2, topk_weights, topk_ids)
    if lora_rows.shape != topk_ids.shape or lora_rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lora_rows must be int32/int64 of the shape of topk_ids {tuple(topk_ids.shape)}, got "
                         f"{lora_rows.dtype} {tuple(lora_rows.shape)}")
    hidden, two_i, inter = w13.shape[2], w13.shape[1], w2.shape[2]
    n, r = (a13.shape[0], a13.shape[1]) if a13.dim() == 3 else (-1, -1)
    want = {"a13": (n, r, hidden), "b13": (n, two_i, r), "a2": (n, r, inter), "b2": (n, hidden, r)}
    for (name, shape), t in zip(want.items(), (a13, b13, a2, b2)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (N={n}, r={r} from a13), got {tuple(t.shape)}")


def fused_moe_lora_ref(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
    lora_rows: torch.Tensor,  # [T, K], -1: the pair has no adapter
    a13: torch.Tensor,  # [N, r, H]
    b13: torch.Tensor,  # [N, 2I, r]
    a2: torch.Tensor,  # [N, r, I]
    b2: torch.Tensor,  # [N, H, r]
) -> torch.Tensor:
    """Routed output [T, H] in hidden_states.dtype, `fused_moe_ref`'s plus each adapted pair's updates;
    differentiable in every float input. Pairs are sorted by expert (one matmul per expert and projection);
    the updates run over all pairs at once, each pair its own row."""
    check_fused_moe_lora_args(hidden_states, w13, w2, topk_weights, topk_ids, lora_rows, a13, b13, a2, b2)
    num_tokens, hidden = hidden_states.shape
    num_experts, intermediate = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    acc = acc_dtype(hidden_states.dtype)
    out = torch.zeros(num_tokens, hidden, dtype=acc, device=hidden_states.device)  # [T, H]
    if topk_ids.numel() == 0:
        return out.to(hidden_states.dtype)
    flat_ids = topk_ids.reshape(-1).long()  # [P]
    order = torch.argsort(flat_ids, stable=True)  # [P] pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    if len(counts) > num_experts:
        raise ValueError(f"topk_ids holds expert ids >= num_experts={num_experts}")
    token_of_pair = order // top_k  # [P]
    rows = lora_rows.reshape(-1)[order]  # [P]
    x = hidden_states[token_of_pair]  # [P, H]

    def per_expert(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [P, in] -> [P, out], sorted pairs
        return torch.cat([F.linear(part, w[e]) for e, part in enumerate(inp.split(counts)) if counts[e]])

    gate_up = lora_expand_ref(per_expert(x, w13).to(acc), lora_shrink_ref(x, a13, rows), b13, rows)  # [P, 2I]
    act = (F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]).to(hidden_states.dtype)  # [P, I]
    y = lora_expand_ref(per_expert(act, w2).to(acc), lora_shrink_ref(act, a2, rows), b2, rows)  # [P, H]
    y = y * topk_weights.reshape(-1)[order].to(acc).unsqueeze(1)
    return out.index_add(0, token_of_pair, y).to(hidden_states.dtype)
