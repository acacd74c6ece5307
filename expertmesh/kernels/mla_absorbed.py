"""MLA decode with absorbed weights, end to end: from the per-head query to the per-head value output.

`kv_b_weight` [H * (nope + v), R] is `kv_b_proj.weight`: per head, `nope` rows of W_UK then `v` rows of
W_UV. The query's no-RoPE part is folded into latent space by W_UK, attention runs over the paged latent
cache (`mla_decode_attention`), and W_UV maps the latent output back to per-head values.
"""

import torch


def split_kv_b(kv_b_weight: torch.Tensor, num_heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_UK [H, nope, R], W_UV [H, v, R]) as views of kv_b_proj.weight."""
    w = kv_b_weight.view(num_heads, -1, kv_b_weight.shape[1])  # [H, nope + v, R]
    return w[:, :nope], w[:, nope:]


def mla_decode_absorbed_ref(
    q_nope: torch.Tensor,  # [B, H, nope]
    q_pe: torch.Tensor,  # [B, H, Dr], already rotated
    kv_b_weight: torch.Tensor,  # [H * (nope + v), R]
    ckv_cache: torch.Tensor,  # [N, block_size, R]
    kpe_cache: torch.Tensor,  # [N, block_size, Dr]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:
    """Attention output per head [B, H, v]."""
    from .registry import mla_decode_attention  # the latent-space core dispatches on its own

    num_heads, nope = q_nope.shape[1], q_nope.shape[2]
    if kv_b_weight.shape[0] % num_heads or kv_b_weight.shape[0] // num_heads <= nope:
        raise ValueError(f"kv_b_weight must be [H={num_heads} * (nope={nope} + v), R], got {tuple(kv_b_weight.shape)}")
    w_uk, w_uv = split_kv_b(kv_b_weight, num_heads, nope)
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, R]
    o_latent = mla_decode_attention(
        q_latent.contiguous(), q_pe.contiguous(), ckv_cache, kpe_cache, block_tables, context_lens, scale
    )  # [B, H, R]
    return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, v]


def mla_decode_step_ref(
    q: torch.Tensor,  # [B, H, nope + Dr], q_b_proj (or q_proj) output
    kv_a: torch.Tensor,  # [B, R + Dr], kv_a_proj_with_mqa output
    kv_norm_weight: torch.Tensor,  # [R]
    eps: float,
    cos: torch.Tensor,  # [B, Dr/2]
    sin: torch.Tensor,
    interleave: bool,
    kv_b_weight: torch.Tensor,  # [H * (nope + v), R]
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [B] int64, where this step's latent and rope key go
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One MLA decode step after the projections -> [B, H, v]: normalise the latent, rotate the rotary
    parts, write both into the cache, attend in absorbed form. Writes the caches in place."""
    from .registry import mla_decode_absorbed, rms_norm
    from .rope import apply_rope

    rank, rope_dim = ckv_cache.shape[2], kpe_cache.shape[2]
    c_kv, k_pe = kv_a.split([rank, rope_dim], dim=-1)
    c_kv = rms_norm(c_kv, kv_norm_weight, eps)  # [B, R]
    k_pe = apply_rope(k_pe[:, None, :], cos, sin, interleave)[:, 0]  # [B, Dr]
    ckv_cache.view(-1, rank).index_copy_(0, slot_mapping, c_kv.to(ckv_cache.dtype))
    kpe_cache.view(-1, rope_dim).index_copy_(0, slot_mapping, k_pe.to(kpe_cache.dtype))
    q_nope, q_pe = q.split([q.shape[-1] - rope_dim, rope_dim], dim=-1)
    q_pe = apply_rope(q_pe, cos, sin, interleave)
    return mla_decode_absorbed(q_nope, q_pe, kv_b_weight, ckv_cache, kpe_cache, block_tables, context_lens, scale)
