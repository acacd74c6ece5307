"""Reading and writing the paged KV cache from torch (the CPU path; CUDA decode uses the Triton kernel)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from expertmesh.model.attention_metadata import AttentionMetadata


def write_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """cache [N, block_size, ...] <- values [T, ...] at flat slots [T]."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, values.to(cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One sequence's first `context_len` cached entries: [context_len, ...]."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:context_len]


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


def attend_by_sequence(
    meta: AttentionMetadata,
    out: torch.Tensor,  # [T, H, D], filled in place
    *,
    cached: bool,
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk: Callable[[int, slice], torch.Tensor],
) -> torch.Tensor:
    """Runs every single-token sequence through one batched `decode(rows, seqs)` call (when there is a
    cache to read) and every other sequence through `chunk(seq, rows)`, one at a time. Without a cache,
    every sequence is a chunk attending to its own tokens."""
    chunks = meta.chunk_seqs if cached else range(meta.num_seqs)
    if cached and len(meta.decode_seqs):
        out[meta.decode_rows] = decode(meta.decode_rows, meta.decode_seqs)
    for s in chunks:
        rows = slice(meta.query_starts[s], meta.query_starts[s] + meta.query_lens[s])
        out[rows] = chunk(s, rows)
    return out
