"""When a request stops: end-of-sequence and stop tokens, stop strings, max_tokens, the model's length."""

from __future__ import annotations

from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class StopChecker:
    """Tracks one request's text and decides, token by token, whether it has finished."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_token_ids: tuple[int, ...]):
        self.params = params
        self.eos_token_ids = () if params.ignore_eos else tuple(eos_token_ids)
        self.stop_token_ids = tuple(params.stop_token_ids or ())
        self._detok = IncrementalDetokenizer(tokenizer, None, params.skip_special_tokens)
        self._truncated: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        return self._truncated if self._truncated is not None else self._detok.text

    def banned_token_ids(self, num_output_tokens: int) -> tuple[int, ...]:
        """Tokens that may not be sampled yet: ending tokens before min_tokens are out."""
        if num_output_tokens < self.params.min_tokens:
            return self.eos_token_ids + self.stop_token_ids
        return ()

    def check(self, token_id: int, num_output_tokens: int, at_max_model_len: bool) -> str | None:
        """Feeds the newest token; returns "stop" or "length" when the request is done, else None."""
        if token_id in self.eos_token_ids or token_id in self.stop_token_ids:
            # As in vLLM, the ending token stays in token_ids but its text only with include_stop_str_in_output.
            if self.params.include_stop_str_in_output:
                self._detok.push(token_id)
            self._detok.flush()
            self.stop_reason = None if token_id in self.eos_token_ids else token_id
            return "stop"
        delta = self._detok.push(token_id)
        # Like ending tokens, stop strings count only once min_tokens tokens precede the newest one (vLLM).
        if self.params.stop and delta and num_output_tokens > self.params.min_tokens:
            if self._match_stop_string(len(delta)):
                return "stop"
        if num_output_tokens >= self.params.max_tokens or at_max_model_len:
            self._detok.flush()
            return "length"
        return None

    def _match_stop_string(self, delta_len: int) -> bool:
        text = self._detok.text
        for stop in self.params.stop:
            start = max(0, len(text) - delta_len - len(stop) + 1)  # only matches that use the new text
            idx = text.find(stop, start)
            if idx >= 0:
                end = idx + len(stop) if self.params.include_stop_str_in_output else idx
                self._truncated = text[:end]
                self.stop_reason = stop
                return True
        return False
