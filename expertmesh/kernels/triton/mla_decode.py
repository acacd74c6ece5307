"""MLA decode Triton kernel: one program per (sequence, block of heads), online softmax over the
sequence's tokens read through its block table (no split-K)."""

import torch
import triton
import triton.language as tl

from ..mla_decode import check_mla_decode_args
from .common import dot, dot_options, unit_last_stride


@triton.jit
def _mla_decode_kernel(
    q_latent_ptr, q_rope_ptr, ckv_ptr, kpe_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    scale, num_heads, rank, rope_dim, page_size,
    stride_ql_b, stride_ql_h, stride_qr_b, stride_qr_h,
    stride_ckv_blk, stride_ckv_slot, stride_kpe_blk, stride_kpe_slot,
    stride_bt_b, stride_out_b, stride_out_h,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [Hb]
    real_head = heads < num_heads
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_DR)
    real_r = r < rank
    real_d = d < rope_dim

    q_lat_ptrs = q_latent_ptr + seq * stride_ql_b + heads[:, None] * stride_ql_h + r[None, :]
    q_lat = tl.load(q_lat_ptrs, mask=real_head[:, None] & real_r[None, :], other=0.0)  # [Hb, R]
    q_rope_ptrs = q_rope_ptr + seq * stride_qr_b + heads[:, None] * stride_qr_h + d[None, :]
    q_rope = tl.load(q_rope_ptrs, mask=real_head[:, None] & real_d[None, :], other=0.0)  # [Hb, Dr]

    context_len = tl.load(context_lens_ptr + seq)
    running_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for start in range(0, context_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [N] token positions
        real_pos = pos < context_len
        page = tl.load(block_tables_ptr + seq * stride_bt_b + pos // page_size, mask=real_pos, other=0).to(tl.int64)
        slot = pos % page_size
        ckv_ptrs = ckv_ptr + (page * stride_ckv_blk + slot * stride_ckv_slot)[:, None] + r[None, :]
        ckv = tl.load(ckv_ptrs, mask=real_pos[:, None] & real_r[None, :], other=0.0)  # [N, R]
        kpe_ptrs = kpe_ptr + (page * stride_kpe_blk + slot * stride_kpe_slot)[:, None] + d[None, :]
        kpe = tl.load(kpe_ptrs, mask=real_pos[:, None] & real_d[None, :], other=0.0)  # [N, Dr]

        scores = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        scores = dot(q_lat, tl.trans(ckv), scores, DOT_PRECISION, DOT_UPCAST)
        scores = dot(q_rope, tl.trans(kpe), scores, DOT_PRECISION, DOT_UPCAST)  # [Hb, N]
        scores = tl.where(real_pos[None, :], scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))  # finite: the chunk has a real token
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])  # [Hb, N]
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = dot(probs.to(ckv.dtype), ckv, acc * rescale[:, None], DOT_PRECISION, DOT_UPCAST)  # [Hb, R]
        running_max = new_max

    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]  # empty sequences stay 0
    out_ptrs = out_ptr + seq * stride_out_b + heads[:, None] * stride_out_h + r[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=real_head[:, None] & real_r[None, :])


def mla_decode_attention_triton(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same contract as ``mla_decode_attention_ref``, forward only."""
    check_mla_decode_args(q_latent, q_rope, ckv_cache, kpe_cache, block_tables, context_lens)
    batch, num_heads, rank = q_latent.shape
    rope_dim = q_rope.shape[2]
    q_latent, q_rope = unit_last_stride(q_latent), unit_last_stride(q_rope)
    ckv_cache, kpe_cache = unit_last_stride(ckv_cache), unit_last_stride(kpe_cache)
    block_tables, context_lens = unit_last_stride(block_tables), context_lens.contiguous()
    out = torch.empty(batch, num_heads, rank, dtype=q_latent.dtype, device=q_latent.device)
    if batch == 0:
        return out
    block_h = 16  # tl.dot needs >= 16 rows; extra heads are masked
    _mla_decode_kernel[(batch, triton.cdiv(num_heads, block_h))](
        q_latent, q_rope, ckv_cache, kpe_cache, block_tables, context_lens, out,
        float(scale), num_heads, rank, rope_dim, ckv_cache.shape[1],
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        ckv_cache.stride(0), ckv_cache.stride(1), kpe_cache.stride(0), kpe_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_H=block_h, BLOCK_N=32,
        BLOCK_R=max(triton.next_power_of_2(rank), 16), BLOCK_DR=max(triton.next_power_of_2(rope_dim), 16),
        **dot_options(q_latent.dtype),
    )  # fmt: skip
    return out
