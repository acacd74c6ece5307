"""Grouped-query decode attention over a paged K/V cache (Mixtral, Qwen-MoE, OLMoE), torch reference.

Query head ``h`` attends with KV head ``h // (H / KVH)`` over its sequence's cached keys: the whole context, or its
last ``window`` positions. The compiled CPU kernel (csrc/gqa_decode.cpp) reads the cache in place; this reference
gathers each context into a padded batch.
"""

from __future__ import annotations

import torch

from .paged_attention import attention_mask, gather_batch, masked_softmax_attention


def check_gqa_decode_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window: int | None,
) -> None:
    """Raise ``ValueError`` naming the argument whose shape does not fit the others."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got shape {tuple(q.shape)}")
    batch, heads, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must be [N_blocks, block_size, KVH, D={head_dim}], got shape {tuple(k_cache.shape)}")
    if k_cache.shape[2] == 0 or heads % k_cache.shape[2]:
        raise ValueError(f"q's {heads} heads must be a multiple of k_cache's {k_cache.shape[2]} KV heads")
    if v_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must be [{', '.join(map(str, k_cache.shape[:3]))}, Dv], got shape "
                         f"{tuple(v_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_blocks], got shape {tuple(block_tables.shape)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [B={batch}], got shape {tuple(context_lens.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of positions or None, got {window}")


def gqa_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """One query per sequence ``q [B, H, D]`` (the last position of its context) -> ``[B, H, Dv]`` in q's dtype.

    The cache is read back in q's dtype and the scores are softmaxed in float32. Cache slots past ``context_lens``
    are masked out; every sequence has at least one cached position (its own, written before this runs).
    """
    check_gqa_decode_args(q, k_cache, v_cache, block_tables, context_lens, window)
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    max_len = int(context_lens.max())
    k = gather_batch(k_cache, block_tables, max_len).to(q.dtype).permute(0, 2, 1, 3)  # [B, KVH, L, D]
    v = gather_batch(v_cache, block_tables, max_len).to(q.dtype).permute(0, 2, 1, 3)
    qg = q.view(batch, kv_heads, heads // kv_heads, head_dim)  # [B, KVH, rep, D]
    query_pos = (context_lens.long() - 1)[:, None]  # [B, 1]
    mask = attention_mask(query_pos, max_len, context_lens, window)[:, None]  # [B, 1, 1, L]
    o = masked_softmax_attention(qg, k, v, mask, scale)  # [B, KVH, rep, Dv]
    return o.reshape(batch, heads, v_cache.shape[3])
