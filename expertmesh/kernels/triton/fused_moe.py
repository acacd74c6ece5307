"""Fused MoE Triton kernels: two grouped GEMMs over blocks of expert-sorted (token, slot) pairs.

``moe_align_block_size`` lays the pairs out so that every block of ``BLOCK_M`` rows belongs to
one expert. Kernel 1 computes ``silu(x @ gate.T) * (x @ up.T)`` into an ``[T*K, I]`` buffer,
kernel 2 multiplies by ``w2[e].T`` and the routing weight into ``[T*K, H]`` (fp32); the K slots
of a token are then summed.
"""

import torch
import triton
import triton.language as tl

from ..fused_moe import check_fused_moe_args, moe_align_block_size
from . import moe_align
from .common import dot, dot_options, unit_last_stride


@triton.jit(do_not_specialize=["num_pairs"])  # one compile for any token count
def _gate_up_silu_kernel(
    x_ptr, w13_ptr, act_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr,
    num_pairs, top_k, hidden, intermediate,
    stride_x_t, stride_w13_e, stride_w13_n, stride_act_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ids_ptr + block).to(tl.int64)
    if expert < 0:  # past the last used block
        return
    pair = tl.load(sorted_pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [M]
    real_row = pair < num_pairs
    token = pair // top_k
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [N] rows of gate / up
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
    act = gate * tl.sigmoid(gate) * up
    act_ptrs = act_ptr + pair[:, None] * stride_act_p + cols[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=real_row[:, None] & real_col[None, :])


@triton.jit(do_not_specialize=["num_pairs"])  # one compile for any token count
def _down_weighted_kernel(
    act_ptr, w2_ptr, weights_ptr, out_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr,
    num_pairs, hidden, intermediate,
    stride_act_p, stride_w2_e, stride_w2_n, stride_out_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ids_ptr + block).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(sorted_pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [M]
    real_row = pair < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [N] hidden units
    real_col = cols < hidden
    ks = tl.arange(0, BLOCK_K)

    act_ptrs = act_ptr + pair[:, None] * stride_act_p + ks[None, :]  # [M, K]
    w_ptrs = w2_ptr + expert * stride_w2_e + cols[None, :] * stride_w2_n + ks[:, None]  # [K, N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, intermediate, BLOCK_K):
        real_k = ks + k0 < intermediate
        act = tl.load(act_ptrs, mask=real_row[:, None] & real_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=real_k[:, None] & real_col[None, :], other=0.0)
        acc = dot(act, w, acc, DOT_PRECISION, DOT_UPCAST)
        act_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    routing_weight = tl.load(weights_ptr + pair, mask=real_row, other=0.0).to(tl.float32)  # [M]
    out_ptrs = out_ptr + pair[:, None] * stride_out_p + cols[None, :]
    tl.store(out_ptrs, acc * routing_weight[:, None], mask=real_row[:, None] & real_col[None, :])


CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def tile_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int,
                element_size: int = 2) -> dict:
    """Launch config of both kernels: ``dict(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``.

    ``BLOCK_M`` rows of expert-sorted pairs per program (small when few pairs land on each expert, so
    padding stays cheap), ``BLOCK_N`` output columns, ``BLOCK_K`` the reduction step (the weight tiles
    are read K-contiguous, so ``BLOCK_K`` sets the length of each contiguous run: 64 bf16 values are
    128 bytes). ``num_warps`` and ``num_stages`` are Triton launch options (ignored under
    ``TRITON_INTERPRET=1``). Depends only on the shapes, never on the routing, so it costs no host sync.

    Chosen by ``bench/gpu/fused_moe_sweep.py`` on an H200 (bf16, DeepSeek-V2-Lite and Mixtral shapes,
    1 to 2048 tokens): each regime's pick was within 5% of that case's best of 40 configs where the
    kernels, not the host, set the time (RESULTS.md). fp32 tiles take twice the shared memory, so they
    get half the pipeline stages.
    """
    num_pairs = num_tokens * top_k
    stages = 4 if element_size <= 2 else 2
    if num_pairs <= 2 * num_experts * 16:  # few pairs per expert: short row blocks
        return {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": stages}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": stages}


def fused_moe_triton(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Same contract as ``fused_moe_ref``, forward only. Expert ids are not range-checked (that
    would cost a host sync): ids outside ``[0, E)`` are an error of the caller.

    ``config`` overrides keys of ``tile_config(...)`` (any of ``CONFIG_KEYS``), e.g. for a sweep."""
    check_fused_moe_args(hidden_states, w13, w2, topk_weights, topk_ids)
    if hidden_states.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fused_moe_triton supports fp32, bf16 and fp16, got {hidden_states.dtype}")
    num_tokens, hidden = hidden_states.shape
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return hidden_states.new_zeros(num_tokens, hidden)
    x, w13, w2 = unit_last_stride(hidden_states), unit_last_stride(w13), unit_last_stride(w2)
    pair_weights = topk_weights.reshape(-1).float().contiguous()  # [T*K]

    cfg = tile_config(num_tokens, top_k, num_experts, hidden, intermediate, hidden_states.element_size())
    if config:
        unknown = set(config) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"config keys must be among {CONFIG_KEYS}, got {sorted(unknown)}")
        cfg.update(config)
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], **dot_options(x.dtype)}
    # one launch for the few pairs of a decode step, where the reference's ~15 small ops cost more host
    # time than the experts take on the GPU
    one_launch = moe_align.fits(num_pairs, num_experts)
    align = moe_align.moe_align_block_size_triton if one_launch else moe_align_block_size
    sorted_pair_ids, block_expert_ids, _ = align(topk_ids, block_m, num_experts)
    num_blocks = block_expert_ids.numel()

    act = torch.empty(num_pairs, intermediate, dtype=x.dtype, device=x.device)  # [T*K, I]
    _gate_up_silu_kernel[(num_blocks, triton.cdiv(intermediate, block_n))](
        x, w13, act, sorted_pair_ids, block_expert_ids,
        num_pairs, top_k, hidden, intermediate,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch,
    )  # fmt: skip
    out_per_pair = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)  # [T*K, H]
    _down_weighted_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        act, w2, pair_weights, out_per_pair, sorted_pair_ids, block_expert_ids,
        num_pairs, hidden, intermediate,
        act.stride(0), w2.stride(0), w2.stride(1), out_per_pair.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch,
    )  # fmt: skip
    return out_per_pair.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
