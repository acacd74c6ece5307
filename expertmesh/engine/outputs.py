"""Request outputs in vLLM's shape: `RequestOutput.outputs[0].token_ids / .text / .finish_reason`."""

from __future__ import annotations

from dataclasses import dataclass, field

from expertmesh.engine.lora_request import LoRARequest


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Per generated token: {token_id: logprob} holding the sampled token and the top-N (when asked).
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    lora_request: LoRARequest | None = None  # the adapter it ran with, as in vLLM; None: the base model

    def add(self, later: RequestOutput) -> None:
        """Appends a later delta output of the same request to this one (which becomes their sum)."""
        if later.request_id != self.request_id:
            raise ValueError(f"cannot add an output of {later.request_id!r} to one of {self.request_id!r}")
        for mine, theirs in zip(self.outputs, later.outputs):
            mine.text += theirs.text
            mine.token_ids.extend(theirs.token_ids)
            if theirs.logprobs is not None:
                if mine.logprobs is None:
                    mine.logprobs = []
                mine.logprobs.extend(theirs.logprobs)
            mine.cumulative_logprob = theirs.cumulative_logprob
            mine.finish_reason, mine.stop_reason = theirs.finish_reason, theirs.stop_reason
        self.finished = later.finished
