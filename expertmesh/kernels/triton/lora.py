"""Multi-adapter LoRA Triton kernels: shrink and expand with a stack row per row (Punica's BGMV), and the routed
experts' fused MoE with the adapted pairs' updates.

Shrink and expand run one program per row (and block of output columns): a decode step has a few hundred rows
at most, and each row's A or B is a few tens of KB. In `fused_moe_lora_triton` the gate/up update of every pair
is computed first into a [P, 2I] buffer that the gate/up kernel adds before the activation; the down update is
added, times the routing weight, to the per-pair outputs before the K pairs of a token are summed.
"""

import torch
import triton
import triton.language as tl

from ..fused_moe import moe_align_block_size
from ..lora import check_expand_args, check_fused_moe_lora_args, check_lora_args
from . import moe_align
from .common import dot, dot_options, unit_last_stride
from .fused_moe import _down_weighted_kernel, tile_config


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, rows_ptr, h_ptr,
    in_features, rank, x_div,
    stride_x, stride_a_n, stride_a_r, stride_h,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    real_r = rr < rank
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if row >= 0:
        ks = tl.arange(0, BLOCK_K)
        x_row = x_ptr + (i // x_div) * stride_x  # x_div > 1: rows share an input row (a token's K pairs)
        a_rows = a_ptr + row * stride_a_n + rr[:, None] * stride_a_r  # [R, 1]
        for k0 in range(0, in_features, BLOCK_K):
            real_k = ks + k0 < in_features
            x = tl.load(x_row + k0 + ks, mask=real_k, other=0.0).to(tl.float32)  # [K]
            a = tl.load(a_rows + k0 + ks[None, :], mask=real_r[:, None] & real_k[None, :], other=0.0)  # [R, K]
            acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(h_ptr + i * stride_h + rr, acc, mask=real_r)


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, rows_ptr, y_ptr, scale_ptr,
    out_features, rank,
    stride_h, stride_b_n, stride_b_out, stride_b_r, stride_y,
    HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    if row < 0:  # no adapter: the row of y is not written
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
    rr = tl.arange(0, BLOCK_R)
    real_c = cols < out_features
    real_r = rr < rank
    h = tl.load(h_ptr + i * stride_h + rr, mask=real_r, other=0.0).to(tl.float32)  # [R]
    b_ptrs = b_ptr + row * stride_b_n + cols[:, None] * stride_b_out + rr[None, :] * stride_b_r  # [N, R]
    b = tl.load(b_ptrs, mask=real_c[:, None] & real_r[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(b * h[None, :], axis=1)  # [N]
    if HAS_SCALE:
        delta = delta * tl.load(scale_ptr + i).to(tl.float32)
    y_ptrs = y_ptr + i * stride_y + cols
    y = tl.load(y_ptrs, mask=real_c, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=real_c)


def _block_r(rank: int) -> int:
    return max(triton.next_power_of_2(rank), 2)


def _shrink(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, x_div: int) -> torch.Tensor:
    """h [len(rows), r] fp32: row i is A[rows[i]] x[i // x_div]."""
    a = unit_last_stride(a)
    num_rows, rank = rows.numel(), a.shape[1]
    h = torch.empty(num_rows, rank, dtype=torch.float32, device=x.device)
    if num_rows:
        _shrink_kernel[(num_rows,)](
            x, a, rows, h, x.shape[1], rank, x_div,
            x.stride(0), a.stride(0), a.stride(1), h.stride(0),
            BLOCK_R=_block_r(rank), BLOCK_K=64,
        )  # fmt: skip
    return h


def _expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
            scale: torch.Tensor | None = None) -> torch.Tensor:
    """y[i] += B[rows[i]] h[i] (times scale[i]) in place where rows[i] >= 0."""
    num_rows, out_features, rank = rows.numel(), b.shape[1], b.shape[2]
    block_n = 64
    if num_rows:
        _expand_kernel[(num_rows, triton.cdiv(out_features, block_n))](
            h, b, rows, y, scale if scale is not None else h, out_features, rank,
            h.stride(0), b.stride(0), b.stride(1), b.stride(2), y.stride(0),
            HAS_SCALE=scale is not None, BLOCK_N=block_n, BLOCK_R=_block_r(rank),
        )  # fmt: skip
    return y


def lora_shrink_triton(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Same contract as ``lora_shrink_ref``, forward only. Rows are not range-checked (a host sync)."""
    check_lora_args(x, a, rows, side="a")
    return _shrink(unit_last_stride(x), a, rows.contiguous(), 1)


def lora_expand_triton(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Same contract as ``lora_expand_ref`` (y updated in place and returned), forward only."""
    check_expand_args(y, h, b, rows)
    if y.stride(-1) != 1:
        raise ValueError("lora_expand_triton updates y in place: its last dimension must be dense")
    return _expand(y, h.contiguous(), b, rows.contiguous())


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_lora_silu_kernel(
    x_ptr, w13_ptr, pre_ptr, act_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr,
    num_pairs, top_k, hidden, intermediate,
    stride_x_t, stride_w13_e, stride_w13_n, stride_pre_p, stride_act_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """fused_moe's `_gate_up_silu_kernel` plus the pairs' gate/up updates `pre` [P, 2I] before the activation."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ids_ptr + block).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(sorted_pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [M]
    real_row = pair < num_pairs
    token = pair // top_k
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
    real_col = cols < intermediate
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[:, None] * stride_x_t + ks[None, :]  # [M, K]
    gate_ptrs = w13_ptr + expert * stride_w13_e + cols[None, :] * stride_w13_n + ks[:, None]  # [K, N]
    up_ptrs = gate_ptrs + intermediate * stride_w13_n
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        real_k = ks + k0 < hidden
        x = tl.load(x_ptrs, mask=real_row[:, None] & real_k[None, :], other=0.0)
        w_mask = real_k[:, None] & real_col[None, :]
        gate = dot(x, tl.load(gate_ptrs, mask=w_mask, other=0.0), gate, DOT_PRECISION, DOT_UPCAST)
        up = dot(x, tl.load(up_ptrs, mask=w_mask, other=0.0), up, DOT_PRECISION, DOT_UPCAST)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    out_mask = real_row[:, None] & real_col[None, :]
    pre_ptrs = pre_ptr + pair[:, None] * stride_pre_p + cols[None, :]
    gate += tl.load(pre_ptrs, mask=out_mask, other=0.0)
    up += tl.load(pre_ptrs + intermediate, mask=out_mask, other=0.0)
    act = gate * tl.sigmoid(gate) * up
    act_ptrs = act_ptr + pair[:, None] * stride_act_p + cols[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=out_mask)


def fused_moe_lora_triton(hidden_states, w13, w2, topk_weights, topk_ids, lora_rows, a13, b13, a2, b2):
    """Same contract as ``fused_moe_lora_ref``, forward only; the expert GEMMs are ``fused_moe_triton``'s."""
    check_fused_moe_lora_args(hidden_states, w13, w2, topk_weights, topk_ids, lora_rows, a13, b13, a2, b2)
    num_tokens, hidden = hidden_states.shape
    num_experts, intermediate = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return hidden_states.new_zeros(num_tokens, hidden)
    x, w13, w2 = unit_last_stride(hidden_states), unit_last_stride(w13), unit_last_stride(w2)
    rows = lora_rows.reshape(-1).contiguous()  # [P] pair t * K + k
    pair_weights = topk_weights.reshape(-1).float().contiguous()  # [P]

    cfg = tile_config(num_tokens, top_k, num_experts, hidden, intermediate, hidden_states.element_size())
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], **dot_options(x.dtype)}
    align = moe_align.moe_align_block_size_triton if moe_align.fits(num_pairs, num_experts) else moe_align_block_size
    sorted_pair_ids, block_expert_ids, _ = align(topk_ids, block_m, num_experts)
    num_blocks = block_expert_ids.numel()

    pre = torch.zeros(num_pairs, 2 * intermediate, dtype=torch.float32, device=x.device)  # [P, 2I]
    _expand(pre, _shrink(x, a13, rows, top_k), b13, rows)
    act = torch.empty(num_pairs, intermediate, dtype=x.dtype, device=x.device)  # [P, I]
    _gate_up_lora_silu_kernel[(num_blocks, triton.cdiv(intermediate, block_n))](
        x, w13, pre, act, sorted_pair_ids, block_expert_ids,
        num_pairs, top_k, hidden, intermediate,
        x.stride(0), w13.stride(0), w13.stride(1), pre.stride(0), act.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch,
    )  # fmt: skip
    out_per_pair = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)  # [P, H] weighted
    _down_weighted_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        act, w2, pair_weights, out_per_pair, sorted_pair_ids, block_expert_ids,
        num_pairs, hidden, intermediate,
        act.stride(0), w2.stride(0), w2.stride(1), out_per_pair.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch,
    )  # fmt: skip
    _expand(out_per_pair, _shrink(act, a2, rows, 1), b2, rows, scale=pair_weights)
    return out_per_pair.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
