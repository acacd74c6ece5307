"""MLA decode attention over a paged latent cache, torch reference.

With the weights absorbed, every head attends over the same compressed cache: the key of token
``t`` is ``(ckv_t, kpe_t)`` and its value is ``ckv_t``. The output stays in latent space ``[R]``;
the caller applies ``W_UV``.
"""

import torch


def check_mla_decode_args(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the argument whose shape does not fit the others."""
    if q_latent.dim() != 3:
        raise ValueError(f"q_latent must be [B, Hq, R], got shape {tuple(q_latent.shape)}")
    batch, heads, rank = q_latent.shape
    if q_rope.dim() != 3 or q_rope.shape[:2] != (batch, heads):
        raise ValueError(f"q_rope must be [B={batch}, Hq={heads}, Dr], got shape {tuple(q_rope.shape)}")
    if ckv_cache.dim() != 3 or ckv_cache.shape[2] != rank:
        raise ValueError(f"ckv_cache must be [N_blocks, block_size, R={rank}], got shape {tuple(ckv_cache.shape)}")
    if kpe_cache.shape != (*ckv_cache.shape[:2], q_rope.shape[2]):
        raise ValueError(
            f"kpe_cache must be [{ckv_cache.shape[0]}, {ckv_cache.shape[1]}, Dr={q_rope.shape[2]}], "
            f"got shape {tuple(kpe_cache.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_blocks], got shape {tuple(block_tables.shape)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [B={batch}], got shape {tuple(context_lens.shape)}")


def mla_decode_attention_ref(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention output ``[B, Hq, R]`` in ``q_latent.dtype``; a sequence with no tokens gets zeros.

    Cache slots past ``context_lens`` (and the blocks the table's padding points at) are never
    read into the result, so they may hold garbage, NaN included.
    """
    check_mla_decode_args(q_latent, q_rope, ckv_cache, kpe_cache, block_tables, context_lens)
    page_size = ckv_cache.shape[1]
    max_len = block_tables.shape[1] * page_size
    positions = torch.arange(max_len, device=q_latent.device)  # [L]
    valid = positions < context_lens.unsqueeze(1)  # [B, L]
    pages = block_tables.long()[:, positions // page_size]  # [B, L]
    pages = torch.where(valid, pages, 0)  # table padding may be any value
    slots = positions % page_size  # [L]
    ckv = torch.where(valid.unsqueeze(-1), ckv_cache[pages, slots].float(), 0.0)  # [B, L, R]
    kpe = torch.where(valid.unsqueeze(-1), kpe_cache[pages, slots].float(), 0.0)  # [B, L, Dr]

    scores = torch.einsum("bhr,blr->bhl", q_latent.float(), ckv)
    scores = scale * (scores + torch.einsum("bhd,bld->bhl", q_rope.float(), kpe))  # [B, Hq, L]
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1)  # [B, Hq, L]
    probs = torch.where(valid.any(dim=1)[:, None, None], probs, 0.0)  # empty sequences: NaN -> 0
    return torch.einsum("bhl,blr->bhr", probs, ckv).to(q_latent.dtype)
