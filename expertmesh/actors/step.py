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
    token_slots: list[int] | None = None  # each token's LoRA adapter slot (-1: none); None: no adapter at all

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """The LoRA adapters an actor serves: how many slots of what rank, and the adapter directory each loaded
    slot holds (an actor started to replace another takes them back)."""

    max_loras: int
    max_rank: int
    loaded: dict[int, str]


# The router's plan of one step: per micro-batch, {attention rank: number of tokens}.
StepPlan = Sequence[dict[int, int]]
# Beside it, when a sequence of the step runs with a LoRA adapter: per micro-batch, {attention rank: each
# token's adapter slot, -1 for the base model}.
StepSlots = Sequence[dict[int, list[int]]]
