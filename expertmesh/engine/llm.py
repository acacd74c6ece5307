"""The offline API, shaped like vLLM's: `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

import torch

from expertmesh.engine.llm_engine import EngineConfig, LLMEngine
from expertmesh.engine.outputs import RequestOutput
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import Sequence
from expertmesh.engine.tokenizer import Tokenizer


class LLM:
    """An in-process engine over one checkpoint directory."""

    def __init__(self, model: str, *, dtype: str = "float32", seed: int = 0, **engine_kwargs: Any):
        torch.manual_seed(seed)  # unseeded sampling draws from the global generator, as in vLLM
        self.llm_engine = LLMEngine(EngineConfig(model=str(model), dtype=dtype, **engine_kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: str | dict | Seq[str | dict],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs are in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        engine = self.llm_engine
        # Validate every prompt before queueing any, so a bad one rejects the call without leftovers.
        for i, p in enumerate(prompts):
            engine.prompt_token_ids(p, i)
        order: dict[str, int] = {}
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            request_id = str(next(self._counter))
            order[request_id] = i
            engine.add_request(request_id, prompt, sp, index=i)
        results: list[RequestOutput | None] = [None] * len(prompts)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[order[out.request_id]] = out
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Applies the checkpoint's chat template to one conversation or a list of them, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        # The template already writes the BOS token, so encode without adding special tokens again.
        prompts = [
            {"prompt_token_ids": tok.encode(tok.apply_chat_template(c), add_special_tokens=False)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)

    @staticmethod
    def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts; pass one, or one per prompt")
        return params

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
            _, ids = engine.prompt_token_ids({"prompt_token_ids": prompt}, i)
            engine.prompt_token_ids({"prompt_token_ids": list(cont) or [0]}, i)
            seq = Sequence(prompt_token_ids=ids)
            engine.scheduler.add(seq, max(1, len(cont)))
            seqs.append(seq)
            rows.append(torch.empty(len(ids) + len(cont), self.llm_engine.model_config.vocab_size))
        pending = {seq.seq_id: (i, list(conts[i])) for i, seq in enumerate(seqs)}
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
        return rows
