"""The OpenAI request bodies the server accepts, as pydantic models (they also make the OpenAPI schema).

Types are strict: `"max_tokens": "5"` is an error naming `max_tokens`, as with OpenAI, rather than a
silent coercion. Fields OpenAI clients send that the engine cannot honour (penalties, logit_bias, echo,
suffix, non-text content) are refused with a message that names them, never ignored; fields that change
nothing about the output (`user`, `metadata`, ...) are ignored, like unknown ones.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

MAX_N = 8  # completions per prompt
MAX_PROMPTS = 64  # prompts in one completions request
MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_MESSAGES = 512
MAX_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # seeds: torch.Generator.manual_seed overflows past these
MAX_TOP_K = (1 << 31) - 1  # clamped to the vocabulary anyway; bounded so it fits the sampler's int64 tensor
MIN_TOP_P = 1e-6  # smaller ones round to 0.0 in float32 and the sampler would keep no token at all


def _encodable(text: str) -> str:
    # JSON's \ud800 escapes give lone surrogates, which the tokenizer cannot take
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone UTF-16 surrogate at character {e.start}; send valid Unicode") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_encodable)]  # text that reaches the tokenizer
Number = StrictFloat  # takes ints too, but not bools or strings
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
Prompt = Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | Annotated[
    list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
Stop = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_encodable)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[Number, Field(ge=MIN_TOP_P, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=MAX_TOP_K)] | None = None  # vLLM's extension; 0 or -1 disables it
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    seed: Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    ignore_eos: StrictBool = False  # vLLM's extension
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0  # vLLM's extension
    user: StrictStr | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server; leave it unset or 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; leave it unset")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @model_validator(mode="after")
    def _unsupported_completion_fields(self):
        if self.echo:
            raise ValueError("echo is not supported by this server; leave it false")
        if self.suffix:
            raise ValueError("suffix is not supported by this server; leave it unset")
        if self.best_of not in (None, self.n):
            raise ValueError(f"best_of must equal n ({self.n}) on this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts: strings or token id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=64)] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # the newer name of max_tokens

    @model_validator(mode="after")
    def _chat_fields(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.max_completion_tokens is not None and self.max_tokens is not None:
            raise ValueError("max_completion_tokens and max_tokens are both set: give one of them")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class RebalanceRequest(BaseModel):
    """`POST /v1/experts/rebalance`: rebalance now. `force` swaps whenever the proposal is not worse (the
    policy's minimum gain and load window are skipped)."""

    model_config = ConfigDict(extra="forbid")
    force: StrictBool = False


class ScaleRequest(BaseModel):
    """`POST /v1/experts/scale`: how many expert shards to run (within the deployment's min and max)."""

    model_config = ConfigDict(extra="forbid")
    expert_shards: StrictInt


class LoadLoRAAdapterRequest(BaseModel):
    """`POST /v1/load_lora_adapter`, vLLM's body: serve the peft adapter directory `lora_path` (absolute, inside
    the server's --lora-dirs) under the model name `lora_name`."""

    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    lora_path: Annotated[StrictStr, Field(min_length=1, max_length=4096)]


class UnloadLoRAAdapterRequest(BaseModel):
    """`POST /v1/unload_lora_adapter`, vLLM's body: stop serving `lora_name` (vLLM's optional `lora_int_id` is
    ignored: a name is enough here)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[StrictStr, Field(min_length=1, max_length=256)]
