"""Attention over a paged K/V cache in torch: gathering a batch's contexts, the visibility mask, masked softmax
attention. The references of the paged kernels (gqa_decode) and the CPU prefill path (model/paged.py) use them."""

from __future__ import annotations

import torch


def gather_batch(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Every sequence's cache padded to max_len: [B, max_len, ...] (mask what lies past each context)."""
    block_size = cache.shape[1]
    num_blocks = -(-max_len // block_size)
    return cache[block_tables[:, :num_blocks].long()].flatten(1, 2)[:, :max_len]


def attention_mask(
    query_pos: torch.Tensor, key_len: int, context_lens: torch.Tensor | None = None, window: int | None = None
) -> torch.Tensor:
    """Boolean mask [..., Tq, L] of keys each query may see: causal, within its context, within the window.

    query_pos [..., Tq]; context_lens [...] (batch dims of query_pos) bounds the valid keys.
    """
    key_pos = torch.arange(key_len, device=query_pos.device)
    allowed = key_pos <= query_pos[..., None]
    if context_lens is not None:
        allowed = allowed & (key_pos < context_lens.long()[..., None, None])
    if window is not None:
        allowed = allowed & (query_pos[..., None] - key_pos < window)
    return allowed


def masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale * q k^T) v over the last two dims with a boolean mask; scores in float32.

    q [..., Tq, D], k [..., L, D], v [..., L, Dv], mask broadcastable to [..., Tq, L] -> [..., Tq, Dv].
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)
