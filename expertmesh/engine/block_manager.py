"""Free-list allocator of physical KV-cache blocks (pure Python, no torch).

A sequence's `block_table` lists the physical block ids holding its KV, in token order: token `t`
lives in block `block_table[t // block_size]`. There is no prefix caching, so every block has one
owner and freeing is a plain return to the free list.
"""

from __future__ import annotations

from collections import deque

from expertmesh.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _num_missing(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_missing(seq, num_new_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks so `seq.block_table` covers its computed tokens plus `num_new_tokens`."""
        missing = self._num_missing(seq, num_new_tokens)
        assert missing <= len(self._free), f"seq {seq.seq_id}: needs {missing} blocks, {len(self._free)} free"
        seq.block_table.extend(self._free.popleft() for _ in range(missing))

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table.clear()
        assert len(self._free) <= self.num_blocks, "a block was freed twice"
