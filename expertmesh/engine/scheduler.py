"""Continuous batching with chunked prefill under a per-step token budget (pure Python, no torch).

Each step first serves the running sequences in admission order (a decode costs one token, an
unfinished prefill takes what budget is left), then admits waiting ones FIFO. When the KV cache
cannot hold a running sequence's next tokens, the most recently admitted running sequence is
preempted by recomputation: its blocks are freed and its whole history (prompt plus tokens
generated so far) is prefilled again when it is readmitted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from expertmesh.engine.block_manager import BlockManager
from expertmesh.engine.sequence import Sequence, SequenceStatus


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            _check_positive_int(name, getattr(self, name))


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: `seqs[i]` computes tokens [num_computed_tokens, +num_new_tokens[i])."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    # Fixed at construction: after `postprocess` advances num_computed_tokens the test below would no
    # longer hold, yet the engine reads the mask after postprocess to know which rows to sample.
    sample_mask: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        assert len(self.seqs) == len(self.num_new_tokens)
        self.sample_mask = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(self.seqs, self.num_new_tokens)]

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self._unfinished: dict[int, Sequence] = {}

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def add(self, seq: Sequence, max_new_tokens: int) -> None:
        """Queue a request; ValueError if it could never run, even alone in the cache."""
        if seq.num_prompt_tokens == 0:
            raise ValueError(f"request {seq.seq_id}: prompt is empty")
        _check_positive_int("max_new_tokens", max_new_tokens)
        max_len = seq.num_prompt_tokens + max_new_tokens
        if max_len > self.config.max_model_len:
            raise ValueError(
                f"request {seq.seq_id}: prompt of {seq.num_prompt_tokens} tokens + max_new_tokens "
                f"{max_new_tokens} = {max_len} exceeds max_model_len {self.config.max_model_len}"
            )
        blocks = self.block_manager.blocks_for(max_len)
        if blocks > self.config.num_blocks:
            raise ValueError(
                f"request {seq.seq_id}: {max_len} tokens need {blocks} KV blocks of {self.config.block_size} "
                f"tokens, the cache has only num_blocks {self.config.num_blocks}"
            )
        assert seq.seq_id not in self._unfinished, f"seq {seq.seq_id} added twice"
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._unfinished[seq.seq_id] = seq

    def schedule(self) -> ScheduledBatch | None:
        budget = self.config.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            assert n > 0, f"running seq {seq.seq_id} has nothing to compute"
            # Victims come from the tail, at index >= i, so already scheduled seqs are never taken.
            while not self.block_manager.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq was the last running one, so nothing is left to serve
            self.block_manager.grow(seq, n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            i += 1

        # Admitting right after a preemption would hand the freed blocks to a newcomer and thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_grow(seq, n):
                break
            self.waiting.popleft()
            self.block_manager.grow(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n

        return ScheduledBatch(seqs, counts) if seqs else None

    def postprocess(self, batch: ScheduledBatch) -> None:
        """Mark the batch's tokens computed; call before appending the sampled tokens."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            assert seq.num_computed_tokens <= seq.num_tokens

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self._unfinished.pop(seq.seq_id, None)

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish an unfinished request with reason "abort"; None if it is unknown or already done."""
        seq = self._unfinished.get(seq_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
