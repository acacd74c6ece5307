"""The offline API, shaped like vLLM's: `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq
from typing import Any

import torch

from expertmesh.engine.executor import ExecutorFactory
from expertmesh.engine.llm_engine import EngineConfig, LLMEngine
from expertmesh.engine.lora_request import LoRARequest
from expertmesh.engine.outputs import RequestOutput
from expertmesh.engine.sampling_params import RequestOutputKind, SamplingParams
from expertmesh.engine.sequence import Sequence
from expertmesh.engine.tokenizer import Tokenizer


class LLM:
    """An engine over one checkpoint directory: in this process, or on an actor graph when given
    `executor=ActorGraph(deployment)` (`expertmesh.graph`); both give the same outputs.

    With `enable_lora=True`, `generate(..., lora_request=LoRARequest(name, id, path))` runs prompts with peft
    LoRA adapters, several in one batch; up to `max_loras` adapters of rank up to `max_lora_rank` are resident
    at once (vLLM's defaults: 1 and 16), the least recently used evicted when another is needed."""

    def __init__(self, model: str, *, dtype: str = "float32", seed: int = 0, executor: ExecutorFactory | None = None,
                 enable_lora: bool = False, max_loras: int = 1, max_lora_rank: int = 16, **engine_kwargs: Any):
        torch.manual_seed(seed)  # unseeded sampling draws from the global generator, as in vLLM
        config = EngineConfig(model=str(model), dtype=dtype, enable_lora=enable_lora, max_loras=max_loras,
                              max_lora_rank=max_lora_rank, **engine_kwargs)
        self.llm_engine = LLMEngine(config, executor)
        self._counter = itertools.count()

    def shutdown(self) -> None:
        """Stops the executor: the actor graph, if any, and the Ray cluster it started."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: str | dict | Seq[str | dict],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs are in input order. `lora_request`: one adapter for every
        prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        loras = self._loras_per_prompt(lora_request, len(prompts))
        engine = self.llm_engine
        order: dict[str, int] = {}
        results: list[RequestOutput | None] = [None] * len(prompts)
        try:
            for i, (prompt, sp, lora) in enumerate(zip(prompts, params, loras)):
                request_id = str(next(self._counter))
                # only the finished output is kept: the engine need not build one every step
                sp = dataclasses.replace(sp, output_kind=RequestOutputKind.FINAL_ONLY)
                engine.add_request(request_id, prompt, sp, index=i, lora_request=lora)
                order[request_id] = i
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
        except BaseException:
            # A bad prompt (or an interrupt) rejects the whole call: nothing of it stays queued or cached.
            for request_id in order:
                engine.abort_request(request_id)
            raise
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Applies the checkpoint's chat template to one conversation or a list of them, then generates."""
        if not isinstance(messages, list) or not messages:
            raise ValueError(
                "messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists; "
                f"got {messages!r:.80}"
            )
        conversations = messages if isinstance(messages[0], list) else [messages]
        tok = self.get_tokenizer()
        # The template already writes the BOS token, so encode without adding special tokens again.
        prompts = [
            {"prompt_token_ids": tok.encode(tok.apply_chat_template(c), add_special_tokens=False)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, lora_request=lora_request)

    @staticmethod
    def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts; pass one, or one per prompt")
        for i, sp in enumerate(params):
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be SamplingParams, got {type(sp).__name__}")
        return params

    @staticmethod
    def _loras_per_prompt(lora_request, n: int) -> list[LoRARequest | None]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * n
        if not isinstance(lora_request, (list, tuple)):
            raise TypeError(f"lora_request must be a LoRARequest, a list of them (None for the base model) or None, "
                            f"got {type(lora_request).__name__}")
        if len(lora_request) != n:
            raise ValueError(f"got {len(lora_request)} lora requests for {n} prompts; pass one, or one per prompt")
        for i, lora in enumerate(lora_request):
            if lora is not None and not isinstance(lora, LoRARequest):
                raise TypeError(f"lora_request[{i}] must be a LoRARequest or None, got {type(lora).__name__}")
        return list(lora_request)

    def teacher_forced_logits(
        self, prompt_token_ids: list[list[int]], continuation_token_ids: list[list[int]] | None = None
    ) -> list[torch.Tensor]:
        """Logits at every position, computed the way serving computes them.

        For each sequence: rows 0..P-1 come from one (possibly chunked) batched prefill of the prompt through
        the paged cache; row P+j comes from an incremental decode step that feeds continuation token j.
        Returns float32 tensors [P + C, V], in input order.
        """
        engine = self.llm_engine
        conts = continuation_token_ids or [[] for _ in prompt_token_ids]
        if len(conts) != len(prompt_token_ids):
            raise ValueError("continuation_token_ids must have one list per prompt")
        seqs, rows = [], []
        for i, (prompt, cont) in enumerate(zip(prompt_token_ids, conts)):
            _, ids = engine.prompt_token_ids({"prompt_token_ids": prompt}, i, name="prompt_token_ids")
            if cont:
                engine.prompt_token_ids({"prompt_token_ids": cont}, i, name="continuation_token_ids")
            seqs.append(Sequence(prompt_token_ids=ids))
            rows.append(torch.empty(len(ids) + len(cont), self.llm_engine.model_config.vocab_size))
        pending = {seq.seq_id: (i, list(conts[i])) for i, seq in enumerate(seqs)}
        try:
            for seq, cont in zip(seqs, conts):
                engine.scheduler.add(seq, max(1, len(cont)))
            self._teacher_force(pending, rows)
        except BaseException:
            for seq in seqs:  # leave the scheduler and cache as they were
                engine.scheduler.abort(seq.seq_id)
            raise
        return rows

    def _teacher_force(self, pending: dict[int, tuple[int, list[int]]], rows: list[torch.Tensor]) -> None:
        engine = self.llm_engine
        while pending:
            batch = engine.scheduler.schedule()
            assert batch is not None, "scheduler stalled with work pending"
            starts = [s.num_computed_tokens for s in batch.seqs]
            logits = engine.run_batch(batch)
            offset = 0
            for seq, start, n, done in zip(batch.seqs, starts, batch.num_new_tokens, batch.sample_mask):
                i, cont = pending[seq.seq_id]
                rows[i][start : start + n] = logits[offset : offset + n]
                offset += n
                if done:
                    if cont:
                        seq.append_token(cont.pop(0))
                    else:
                        engine.scheduler.finish(seq, "length")
                        del pending[seq.seq_id]
