"""Where each token of a flattened batch reads and writes the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """A batch of S sequences flattened to T tokens; sequence s owns rows [query_start[s], query_start[s+1]).

    Each sequence's new tokens sit at the end of its context: they occupy positions
    context_lens[s] - query_lens[s] .. context_lens[s] - 1, and their KV goes to `slot_mapping`
    (block * block_size + offset) before attention reads the cache.
    """

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    query_lens: tuple[int, ...]  # [S]
    context_lens: tuple[int, ...]  # [S], tokens in the cache after this step's write
    block_tables: torch.Tensor  # [S, max_blocks] int32
    context_lens_t: torch.Tensor  # [S] int32
    block_size: int
    query_starts: tuple[int, ...]  # [S]
    # Single-token sequences read the cache through the batched decode path; the rest attend chunk-wise.
    decode_seqs: torch.Tensor  # [D] int64
    decode_rows: torch.Tensor  # [D] int64, their rows in the flat batch
    chunk_seqs: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return not self.chunk_seqs

    @classmethod
    def without_cache(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> AttentionMetadata:
        """Whole sequences attending only to themselves, with no KV cache (training, scoring)."""
        num_blocks = max(seq_lens, default=0)
        return cls.build(query_lens=seq_lens, context_lens=seq_lens, block_size=1, device=device,
                         block_tables=[list(range(num_blocks))] * len(seq_lens))

    @classmethod
    def build(
        cls,
        *,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        max_blocks = max((len(t) for t in block_tables), default=0)
        tables = torch.zeros(len(block_tables), max(max_blocks, 1), dtype=torch.int32)
        for i, t in enumerate(block_tables):
            assert context_lens[i] <= len(t) * block_size, "block table too short for the context"
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        # Per sequence, not per token: each sequence's new positions are one arange.
        positions = torch.cat(
            [torch.arange(c - q, c, dtype=torch.int64) for q, c in zip(query_lens, context_lens, strict=True)]
            or [torch.zeros(0, dtype=torch.int64)]
        )
        lens = torch.tensor(query_lens, dtype=torch.int64)
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), lens)  # [T]
        blocks = tables[seq_of_token, positions // block_size].to(torch.int64)
        slots = blocks * block_size + positions % block_size
        starts = [0]
        for q in query_lens[:-1]:
            starts.append(starts[-1] + q)
        decode = [s for s, q in enumerate(query_lens) if q == 1]
        return cls(
            query_starts=tuple(starts),
            decode_seqs=torch.tensor(decode, dtype=torch.int64, device=device),
            decode_rows=torch.tensor([starts[s] for s in decode], dtype=torch.int64, device=device),
            chunk_seqs=tuple(s for s, q in enumerate(query_lens) if q != 1),
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            query_lens=tuple(query_lens),
            context_lens=tuple(context_lens),
            block_tables=tables.to(device),
            context_lens_t=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_size=block_size,
        )
