"""Reading and writing the paged KV cache from torch (the CPU path; CUDA decode uses the Triton kernel)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from expertmesh.kernels.paged_attention import attention_mask, masked_softmax_attention
from expertmesh.model.attention_metadata import AttentionMetadata

# attention_mask and masked_softmax_attention live in kernels/ (the paged kernels' references use them too) and
# are offered here beside the rest of the model's paged-cache helpers.
__all__ = ["attend_by_sequence", "attention_mask", "gather_context", "masked_softmax_attention", "write_cache"]


def write_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """cache [N, block_size, ...] <- values [T, ...] at flat slots [T]."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, values.to(cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One sequence's first `context_len` cached entries: [context_len, ...]."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:context_len]


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
