"""The engine loop: requests in, scheduled steps through an executor, sampled tokens out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from expertmesh.engine.adapter_registry import AdapterRegistry
from expertmesh.engine.executor import AdapterExecutor, Executor, ExecutorFactory, ExecutorSpec, LocalExecutor
from expertmesh.engine.lora_request import LoRARequest
from expertmesh.engine.outputs import CompletionOutput, RequestOutput
from expertmesh.engine.sampler import make_generator, sample
from expertmesh.engine.sampling_params import RequestOutputKind, SamplingParams
from expertmesh.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from expertmesh.engine.sequence import Sequence
from expertmesh.engine.stop import StopChecker
from expertmesh.engine.tokenizer import ByteTokenizer, Tokenizer, load_eos_token_ids
from expertmesh.model import ModelConfig, MoECausalLM, resolve_dtype
from expertmesh.model.loader import check_activation_dtype
from expertmesh.model.quantize import check_quantization


KV_CACHE_DTYPES = ("auto", "bfloat16")


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineConfig:
    model: str
    dtype: str = "float32"
    device: str = "cpu"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_gib, capped at what max_num_seqs can use
    kv_cache_gib: float = 2.0
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_lora: bool = False  # serve LoRA adapters named per request (vLLM's defaults below)
    max_loras: int = 1  # adapters resident at once: those of unfinished requests must fit
    max_lora_rank: int = 16
    quantization: str | None = None  # "int8", "w8a8" or "experts_int8" (model/quantize.py), at load
    # "auto": the KV cache in the model's dtype; "bfloat16": a float32 model's cache at half the bytes (vLLM's name)
    kv_cache_dtype: str = "auto"
    # "auto": activations in the model's dtype; "float32" over bfloat16 or float16 weights: a float32 residual
    # stream, each matmul reading its input rounded to the weights' dtype, as llama.cpp runs bf16 (model/loader.py)
    activation_dtype: str = "auto"

    def __post_init__(self) -> None:
        check_quantization(self.quantization)
        weights = resolve_dtype(self.dtype)
        if check_activation_dtype(weights, self.activation_dtype) != weights and self.enable_lora:
            raise ValueError(f"enable_lora with activation_dtype={self.activation_dtype!r} is not served: LoRA "
                             "adapters run in the model's dtype; leave one of them out")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization is not None and self.enable_lora:
            raise ValueError(f"enable_lora with quantization={self.quantization!r} is not served: LoRA adapters "
                             "apply to float weights; leave one of them out")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_kv_blocks", "max_model_len"):  # None picks a default
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be positive, got {self.kv_cache_gib!r}")


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    stop: StopChecker
    logprobs: list[dict[int, float]] | None
    lora_request: LoRARequest | None = None
    cumulative_logprob: float = 0.0
    sent_tokens: int = 0  # DELTA outputs: tokens and characters already handed out
    sent_chars: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: ExecutorFactory | None = None):
        """`executor` builds what runs the model (default: `LocalExecutor.build`, the whole model in this
        process; `expertmesh.graph.ActorGraph(deployment)` runs it on an actor graph)."""
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.eos_token_ids = tuple(load_eos_token_ids(config.model)) or self.model_config.eos_token_ids
        max_pos = self.model_config.max_position_embeddings
        self.max_model_len = config.max_model_len or max_pos
        if self.max_model_len > max_pos:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings={max_pos}"
            )
        num_blocks = config.num_kv_blocks or self._default_num_blocks()
        spec = ExecutorSpec(model=config.model, dtype=config.dtype, device=config.device, num_blocks=num_blocks,
                            block_size=config.block_size, max_loras=config.max_loras if config.enable_lora else 0,
                            max_lora_rank=config.max_lora_rank, quantization=config.quantization,
                            kv_cache_dtype=config.kv_cache_dtype, activation_dtype=config.activation_dtype)
        self.executor: Executor = (executor or LocalExecutor.build)(spec)
        self.adapters: AdapterRegistry | None = None  # which adapter each slot of the executor holds
        self._adapter_executor: AdapterExecutor | None = None  # the executor again, when it serves adapters
        if config.enable_lora:
            if not isinstance(self.executor, AdapterExecutor):
                self.executor.shutdown()
                raise ValueError(f"enable_lora=True, but the {self.executor.mode} executor cannot serve LoRA adapters")
            self.adapters, self._adapter_executor = AdapterRegistry(config.max_loras), self.executor
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=config.block_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        ))
        self._requests: dict[int, _Request] = {}  # by seq_id, unfinished only
        self._seq_ids: dict[str, int] = {}  # request_id -> seq_id, unfinished only

    def _default_num_blocks(self) -> int:
        bs = self.config.block_size
        cache_dtype = self.config.dtype if self.config.kv_cache_dtype == "auto" else self.config.kv_cache_dtype
        itemsize = resolve_dtype(cache_dtype).itemsize
        with torch.device("meta"):  # the cache's shapes, without any weights
            shapes = MoECausalLM(self.model_config).cache_shapes(1, bs)
        per_block = sum(itemsize * int(torch.Size(shape).numel()) for layer in shapes for shape in layer)
        budget = int(self.config.kv_cache_gib * 2**30) // per_block
        useful = self.config.max_num_seqs * -(-self.max_model_len // bs)
        return max(1, min(budget, useful))

    # -- requests ---------------------------------------------------------------------------------
    def prompt_token_ids(
        self, prompt: Any, index: int = 0, name: str = "prompts"
    ) -> tuple[str | None, list[int]]:
        """Validates one prompt (a string or {"prompt_token_ids": [...]}) and returns (text, ids); errors
        call it `{name}[{index}]`."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids, text = prompt["prompt_token_ids"], prompt.get("prompt")
            is_list = isinstance(ids, (list, tuple))
            if not is_list or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise TypeError(f"{name}[{index}].prompt_token_ids must be a list of ints")
        else:
            raise TypeError(
                f"{name}[{index}] must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError(f"{name}[{index}] is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            hint = ""
            if isinstance(prompt, str) and isinstance(self.tokenizer, ByteTokenizer):
                hint = ("; the checkpoint has no tokenizer.json and the byte-level fallback needs a vocabulary of at "
                        "least 258 ids: pass {'prompt_token_ids': [...]} instead")
            raise ValueError(f"{name}[{index}] has token ids outside the vocabulary [0, {vocab}): {bad[:5]}{hint}")
        return text, list(ids)

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams, index: int = 0,
                    lora_request: LoRARequest | None = None) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest or None, got {type(lora_request).__name__}")
        if lora_request is not None:
            self._check_lora_enabled(lora_request)
        if request_id in self._seq_ids:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        vocab = self.model_config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:  # banning them for min_tokens would index past the logits
            raise ValueError(f"stop_token_ids has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        text, ids = self.prompt_token_ids(prompt, index)
        seq = Sequence(prompt_token_ids=ids, params=params)
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"prompts[{index}] has {len(ids)} tokens, which leaves no room to generate within "
                f"max_model_len={self.max_model_len}"
            )
        # everything that can refuse the request comes before the scheduler takes it
        generator = make_generator(params.seed, self.executor.device)
        stop = StopChecker(self.tokenizer, params, self.eos_token_ids)
        if lora_request is not None:  # last: from here on a refusal must unpin it
            seq.adapter_slot = self._acquire_adapter(lora_request)
        # Like vLLM, a request whose max_tokens runs past max_model_len stops there with "length".
        try:
            self.scheduler.add(seq, min(params.max_tokens or room, room))
        except ValueError as e:  # name the prompt and the engine settings that would make it fit
            self._release_adapter(lora_request)
            hint = "raise num_kv_blocks (or kv_cache_gib) or lower max_tokens"
            raise ValueError(f"prompts[{index}]: {e}; {hint}") from None
        self._requests[seq.seq_id] = _Request(
            request_id=request_id, prompt=text, seq=seq, params=params,
            generator=generator, stop=stop,
            logprobs=[] if params.logprobs is not None else None, lora_request=lora_request,
        )
        self._seq_ids[request_id] = seq.seq_id
        return seq

    def abort_request(self, request_id: str) -> None:
        """Drops an unfinished request and frees its cache blocks; unknown or finished ids are ignored."""
        seq_id = self._seq_ids.pop(request_id, None)
        if seq_id is not None:
            self.scheduler.abort(seq_id)
            self._release_adapter(self._requests.pop(seq_id).lora_request)

    # -- LoRA adapters outside requests, as vLLM's LLMEngine names these -----------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Loads an adapter into a slot now (evicting the least recently used one that no request runs with,
        if no slot is free), so that a ValueError naming what does not fit comes before any request uses it;
        `AdapterSlotsFull` when every slot holds an adapter of an unfinished request. It stays resident until
        evicted, and is loaded again by the next request naming it after that."""
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        self._check_lora_enabled(lora_request)
        self._acquire_adapter(lora_request)
        self._release_adapter(lora_request)

    def remove_lora(self, lora_int_id: int) -> int:
        """Frees the adapter's slot: now, or once the unfinished requests running with it (how many:
        returned) finish; they run to their end with it."""
        if self.adapters is None:
            raise ValueError("LoRA is not enabled: create the engine with enable_lora=True")
        return self.adapters.forget(lora_int_id)

    def _check_lora_enabled(self, lora_request: LoRARequest) -> None:
        if self.adapters is None:
            raise ValueError(f"got lora_request {lora_request.lora_name!r}, but LoRA is not enabled: create the "
                             "engine with enable_lora=True")

    def _acquire_adapter(self, lora_request: LoRARequest) -> int:
        """The executor slot holding the request's adapter, loaded there if it is not resident; pinned until
        the request finishes."""
        assert self.adapters is not None and self._adapter_executor is not None
        executor = self._adapter_executor

        def load(slot: int) -> None:
            try:
                executor.load_adapter(slot, lora_request.lora_path)
            except ValueError as e:
                raise ValueError(f"LoRA adapter {lora_request.lora_name!r} (lora_int_id "
                                 f"{lora_request.lora_int_id}): {e}") from None

        return self.adapters.acquire(lora_request, load)

    def _release_adapter(self, lora_request: LoRARequest | None) -> None:
        if lora_request is not None:
            assert self.adapters is not None
            self.adapters.release(lora_request.lora_int_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ---------------------------------------------------------------------------------
    @torch.inference_mode()  # the executor's logits are inference tensors: banning tokens writes into them
    def step(self) -> list[RequestOutput]:
        """Runs one scheduled batch; returns an output for every request that gained a token."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        logits = self.executor.execute(batch)
        self.scheduler.postprocess(batch)
        sampled = [s for s, m in zip(batch.seqs, batch.sample_mask) if m]
        if not sampled:
            return []
        reqs = [self._requests[s.seq_id] for s in sampled]
        for row, req in enumerate(reqs):
            banned = req.stop.banned_token_ids(req.seq.num_output_tokens)
            if banned:
                logits[row, list(banned)] = float("-inf")
        result = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        outputs = []
        for row, req in enumerate(reqs):
            token = result.token_ids[row]
            req.seq.append_token(token)
            if req.logprobs is not None:
                entry = dict(result.top_logprobs[row])
                entry[token] = result.sampled_logprobs[row]
                req.logprobs.append(entry)
                req.cumulative_logprob += result.sampled_logprobs[row]
            reason = req.stop.check(token, req.seq.num_output_tokens, req.seq.num_tokens >= self.max_model_len)
            if reason is not None:
                self.scheduler.finish(req.seq, reason)
                del self._requests[req.seq.seq_id]
                del self._seq_ids[req.request_id]
                self._release_adapter(req.lora_request)
            kind = req.params.output_kind
            if kind is RequestOutputKind.DELTA:
                outputs.append(self._delta_output(req))
            elif kind is RequestOutputKind.CUMULATIVE or req.seq.is_finished:
                outputs.append(self._output(req))
        return outputs

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        completion = CompletionOutput(
            index=0,
            text=req.stop.text,
            token_ids=seq.output_token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=req.stop.stop_reason,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
        )
        return self._request_output(req, completion)

    def _delta_output(self, req: _Request) -> RequestOutput:
        """What is new since the last output. Until the request finishes, the last `longest stop string - 1`
        characters stay back: a stop string that completes later is cut from the text, and what was
        already sent cannot be taken back."""
        seq, text = req.seq, req.stop.text
        end = len(text)
        if not seq.is_finished and req.params.stop:
            end = max(req.sent_chars, end - max(map(len, req.params.stop)) + 1)
        first = seq.num_prompt_tokens + req.sent_tokens
        completion = CompletionOutput(
            index=0,
            text=text[req.sent_chars:end],
            token_ids=seq.token_ids[first:],
            finish_reason=seq.finish_reason,
            stop_reason=req.stop.stop_reason,
            logprobs=req.logprobs,  # handed out whole: the engine keeps no entry it has sent
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
        )
        req.sent_chars, req.sent_tokens = end, seq.num_output_tokens
        if req.logprobs is not None:
            req.logprobs = []
        return self._request_output(req, completion)

    @staticmethod
    def _request_output(req: _Request, completion: CompletionOutput) -> RequestOutput:
        seq = req.seq
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=seq.prompt_token_ids,
            outputs=[completion], finished=seq.is_finished, lora_request=req.lora_request,
        )

    def shutdown(self) -> None:
        """Stops the executor (the actor graph and the Ray it started; nothing in local mode)."""
        self.executor.shutdown()

    def run_batch(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits for every scheduled token of a batch (teacher forcing); advances the scheduler."""
        logits = self.executor.execute(batch, all_logits=True)
        self.scheduler.postprocess(batch)
        return logits

