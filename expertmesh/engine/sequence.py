"""One request's token state as the scheduler and block manager see it (no torch here)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens of one request.

    `num_computed_tokens` counts the tokens whose KV is in the paged cache. A step that computes the
    last uncomputed token yields logits from which the next token is sampled. Preemption frees the
    blocks and sets `num_computed_tokens` back to 0: the whole history is recomputed on resume.
    """

    prompt_token_ids: list[int]
    params: Any = None  # SamplingParams; typed loosely so this module stays import-light
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    adapter_slot: int = -1  # the executor's LoRA adapter slot this request runs with; -1: the base model

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))
