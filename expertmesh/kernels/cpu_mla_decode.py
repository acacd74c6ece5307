"""MLA decode attention for CPU inference: whole-block gathers and three batched matmuls.

Same signature and result as `mla_decode_attention_ref`, which gathers the cache slot by slot and masks
every gathered element so that any garbage, NaN included, is ignored. Serving owns its cache (zero
initialised, only ever written with the model's finite activations), so this path gathers whole blocks
with one index and masks only the scores, which removes two [B, L, R] copies per layer.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def mla_decode_attention_cpu(
    q_latent: torch.Tensor,  # [B, H, R]
    q_rope: torch.Tensor,  # [B, H, Dr]
    ckv_cache: torch.Tensor,  # [N, bs, R]
    kpe_cache: torch.Tensor,  # [N, bs, Dr]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:
    batch, heads, rank = q_latent.shape
    block_size = ckv_cache.shape[1]
    max_len = int(context_lens.max()) if batch else 0
    if max_len == 0:
        return torch.zeros_like(q_latent)
    num_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_blocks].long()  # [B, nb]
    ckv = ckv_cache[tables].view(batch, num_blocks * block_size, rank)  # [B, L, R]
    kpe = kpe_cache[tables].view(batch, num_blocks * block_size, -1)  # [B, L, Dr]
    scores = torch.bmm(q_latent, ckv.transpose(1, 2))  # [B, H, L]
    scores.baddbmm_(q_rope, kpe.transpose(1, 2)).mul_(scale)
    positions = torch.arange(num_blocks * block_size)
    invalid = positions >= context_lens.long()[:, None]  # [B, L]
    scores.masked_fill_(invalid[:, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q_latent.dtype)  # [B, H, L]
    empty = context_lens == 0
    if bool(empty.any()):
        probs[empty] = 0.0
    return torch.bmm(probs, ckv)  # [B, H, R]
