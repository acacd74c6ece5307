"""What the executor sends the actors for one step: plain data, pickled by Ray once per actor per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """One micro-batch's share of a step on one attention actor."""

    input_ids: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    logits_indices: list[int]  # rows of this micro-batch's tokens whose logits are returned

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


# The router's plan of one step: per micro-batch, {attention rank: number of tokens}.
StepPlan = Sequence[dict[int, int]]
