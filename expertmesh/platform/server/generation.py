"""Turning a completion or chat request into engine requests and its answer: one JSON body, or server-sent
events as tokens come (usage and logprobs), aborting the engine requests however the response ends.

The engine hands out deltas (text that a stop string could still remove is held back there), so a stream
sends each as it comes, and a whole answer is the sum of its deltas. Building a whole answer (its logprobs
decoded token by token, then JSON) runs in a worker thread: a large one must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from expertmesh.engine.adapter_registry import AdapterSlotsFull
from expertmesh.engine.lora_request import LoRARequest
from expertmesh.engine.outputs import RequestOutput
from expertmesh.platform.server import errors
from expertmesh.platform.server.async_engine import AsyncEngine, EngineDead, QueueFull, RequestAborted

if TYPE_CHECKING:
    from expertmesh.platform.server.app import ServerState

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    """One sub-request (a prompt x one of n) and what has come of it."""

    index: int
    request_id: str
    outputs: AsyncIterator[RequestOutput]
    prompt_tokens: int = 0
    num_tokens: int = 0  # generated so far
    sent_chars: int = 0  # characters streamed so far (the logprobs' text offsets)
    finished: bool = False
    failed: bool = False  # its response ended on a server failure (not the client's leaving)
    total: RequestOutput | None = None  # the sum of its deltas, for a whole answer
    last_time: float = 0.0  # perf_counter of its latest output, for inter-token latency


async def generate(state: ServerState, request: Request, body, prompts: list, prompt_field: str,
                   max_tokens: int | None, logprobs: int | None, *, chat: bool,
                   lora_request: LoRARequest | None = None):
    """Submits every prompt x n (with the LoRA adapter the request's model names, if any), then answers in one
    JSON body or as server-sent events."""
    started = time.perf_counter()
    engine = state.engine
    rid = request.state.request_id
    model = lora_request.lora_name if lora_request is not None else state.settings.model_name  # as vLLM answers
    choices: list[_Choice] = []
    try:
        for p_index, prompt in enumerate(prompts):
            for j in range(body.n):
                params = state.sampling_params(body, max_tokens, j, logprobs)
                sub_id = engine.new_request_id(rid)  # unique even when clients reuse an X-Request-Id
                try:
                    outputs = await engine.generate(sub_id, prompt, params, lora_request)
                except AdapterSlotsFull as e:  # every slot serves running requests: one frees when they finish
                    raise errors.APIError(429, str(e), param="model", code="adapter_slots_full",
                                          headers={"Retry-After": str(state.settings.retry_after_s)}) from None
                except (ValueError, TypeError) as e:
                    message = str(e).replace("prompts[0]", prompt_field if len(prompts) == 1 else
                                             f"{prompt_field}[{p_index}]")
                    raise errors.APIError(400, message, param=prompt_field) from None
                choices.append(_Choice(index=len(choices), request_id=sub_id, outputs=outputs))
    except QueueFull as e:
        state.metrics.rejected.inc()
        await _close(choices, engine)
        raise errors.APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
    except (EngineDead, RequestAborted) as e:
        await _close(choices, engine)
        raise errors.server_failure(rid, e) from None
    except BaseException:
        await _close(choices, engine)
        raise
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(state, body, choices, rid, response_id, model, started, chat, include_usage)
        return _EventStream(state, events, choices)
    try:
        await _drain(state, choices, started)
    except EngineDead as e:
        raise errors.server_failure(rid, e) from None
    except asyncio.CancelledError:
        state.metrics.cancelled.inc()
        raise
    finally:
        await _close(choices, engine)
    answer = await asyncio.to_thread(_full_response_json, state, body, choices, response_id, model, chat)
    state.metrics.latency.labels("/v1/chat/completions" if chat else "/v1/completions").observe(
        time.perf_counter() - started)
    return Response(answer, media_type="application/json")


async def _close(choices: list[_Choice], engine: AsyncEngine | None = None) -> None:
    """Ends every choice's output stream, which aborts a request that has not finished. A stream never
    iterated runs no cleanup when closed, so with `engine` the unfinished requests are aborted by id too."""
    for c in choices:
        await c.outputs.aclose()
        if engine is not None and not c.finished:
            engine.abort(c.request_id)  # a no-op for a request already gone


class _EventStream(StreamingResponse):
    """Server-sent events that end their requests however the response ends: a client that leaves before
    the first event cancels the response before its generator ever runs, and so before its `finally`; one that
    leaves while a chunk is being sent leaves the generator suspended at its `yield`, where its `finally` waits
    for the garbage collector (a reference cycle can hold it for as long as the process idles). So the response
    closes the generator itself, then counts a request that neither finished nor failed as cancelled and aborts
    it."""

    def __init__(self, state: ServerState, events: AsyncIterator[str], choices: list[_Choice]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events, self._state, self._choices = events, state, choices

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:  # whatever the generator's own cleanup raised, the requests are counted and ended
                if not all(c.finished or c.failed for c in self._choices):
                    self._state.metrics.cancelled.inc()
                await _close(self._choices, self._state.engine)


def _observe(state: ServerState, choice: _Choice, out: RequestOutput, started: float) -> None:
    """Counts a delta (one step's token, or several merged while nobody read) into the metrics."""
    now = time.perf_counter()
    new = len(out.outputs[0].token_ids)
    if choice.last_time == 0.0:
        choice.prompt_tokens = len(out.prompt_token_ids)
        state.metrics.prompt_tokens.inc(choice.prompt_tokens)
        state.metrics.ttft.observe(now - started)
    elif new:
        gap = (now - choice.last_time) / new
        for _ in range(new):
            state.metrics.itl.observe(gap)
    state.metrics.generation_tokens.inc(new)
    choice.num_tokens += new
    choice.finished = out.finished
    choice.last_time = now


async def _drain(state: ServerState, choices: list[_Choice], started: float) -> None:
    async def one(choice: _Choice):
        async for out in choice.outputs:
            _observe(state, choice, out, started)
            if choice.total is None:
                choice.total = out
            else:
                choice.total.add(out)

    await asyncio.gather(*(one(c) for c in choices))


def _top_n(body, chat: bool) -> int:
    return (body.top_logprobs or 0) if chat else (body.logprobs or 0)


def _usage(choices: list[_Choice], n: int) -> dict:
    """Token counts; like OpenAI, a prompt's tokens count once however many completions it has."""
    prompt = sum(c.prompt_tokens for c in choices if c.index % n == 0)
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _full_response_json(state: ServerState, body, choices: list[_Choice], response_id: str, model: str,
                        chat: bool) -> bytes:
    """The whole answer, as JSON bytes (built off the event loop, and encoded a slice at a time: see _json)."""
    out_choices = []
    for c in choices:
        comp = c.total.outputs[0]
        lp = "null"
        if comp.logprobs is not None:
            lp = _json(_logprobs(state, comp.token_ids, comp.logprobs, _top_n(body, chat), chat))
        if chat:
            fields = {"index": c.index, "message": {"role": "assistant", "content": comp.text}}
        else:
            fields = {"index": c.index, "text": comp.text}
        out_choices.append(f'{_dumps(fields)[:-1]},"logprobs":{lp},"finish_reason":{_dumps(comp.finish_reason)}}}')
    head = {"id": response_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "usage": _usage(choices, body.n)}
    return f'{_dumps(head)[:-1]},"choices":[{",".join(out_choices)}]}}'.encode()


_SLICE = 256  # list items encoded per json.dumps call


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _json(value) -> str:
    """`json.dumps(value)` for dicts of lists (a logprobs object), a slice of each list at a time. One
    json.dumps call runs in C from start to end without letting another thread run: encoding a 30 MB answer
    at once stalls the event loop for a second, even from a worker thread."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_dumps(k)}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(value[i:i + _SLICE])[1:-1] for i in range(0, len(value), _SLICE)) + "]"
    return _dumps(value)


def _logprobs(state: ServerState, token_ids: list[int], entries: list[dict[int, float]], top_n: int, chat: bool,
              text_offset: int = 0) -> dict:
    """OpenAI's logprobs object for these tokens; `top_n` alternatives per token."""
    pieces: dict[int, str] = {}  # a token's text, decoded once per answer

    def text(t: int) -> str:
        piece = pieces.get(t)
        if piece is None:
            piece = pieces[t] = state.tokenizer.decode([t], skip_special_tokens=False)
        return piece

    tops = [sorted(entry.items(), key=lambda kv: -kv[1])[:top_n] for entry in entries]
    if chat:
        return {"content": [
            {"token": text(t), "logprob": entry[t], "bytes": list(text(t).encode()),
             "top_logprobs": [{"token": text(a), "logprob": v, "bytes": list(text(a).encode())} for a, v in top]}
            for t, entry, top in zip(token_ids, entries, tops)
        ]}
    tokens = [text(t) for t in token_ids]
    offsets, pos = [], text_offset
    for piece in tokens:
        offsets.append(pos)
        pos += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": [entry[t] for t, entry in zip(token_ids, entries)],
        "top_logprobs": [{text(a): v for a, v in top} for top in tops],
        "text_offset": offsets,
    }


async def _stream(state: ServerState, body, choices: list[_Choice], rid: str, response_id: str, model: str,
                  started: float, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per delta of any choice, the last one of a choice with its
    finish_reason, the usage chunk when asked, then `data: [DONE]`. A client that reads slowly holds up
    the pumps at the bounded queue, and its requests' deltas merge in their streams meanwhile."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(choices))

    async def pump(choice: _Choice):
        try:
            async for out in choice.outputs:
                await queue.put((choice, out))
            await queue.put((choice, None))
        except BaseException as e:  # noqa: BLE001 - handed to the writer, which ends the stream
            await queue.put((choice, e))

    def chunk(choice_body: dict) -> str:
        return "data: " + json.dumps({"id": response_id, "object": kind, "created": created, "model": model,
                                      "choices": [choice_body]}) + "\n\n"

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    done = 0
    try:
        if chat:
            for c in choices:
                yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
        while done < len(choices):
            choice, out = await queue.get()
            if out is None:
                done += 1
                continue
            if isinstance(out, BaseException):
                for c in choices:
                    c.failed = True
                failure = errors.server_failure(rid, out)
                yield "data: " + json.dumps(errors.error_body(failure.status, failure.message,
                                                              code=failure.code)) + "\n\n"
                return
            _observe(state, choice, out, started)
            comp = out.outputs[0]
            lp = None
            if comp.logprobs is not None and comp.token_ids:
                lp = _logprobs(state, comp.token_ids, comp.logprobs, _top_n(body, chat), chat, choice.sent_chars)
            if comp.text or out.finished or lp is not None:
                finish = comp.finish_reason if out.finished else None
                if chat:
                    piece = {"index": choice.index, "delta": {"content": comp.text} if comp.text else {},
                             "logprobs": lp, "finish_reason": finish}
                else:
                    piece = {"index": choice.index, "text": comp.text, "logprobs": lp, "finish_reason": finish}
                yield chunk(piece)
                choice.sent_chars += len(comp.text)
        if include_usage:
            yield "data: " + json.dumps({"id": response_id, "object": kind, "created": created, "model": model,
                                         "choices": [], "usage": _usage(choices, body.n)}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client may have gone: _EventStream, once this has run, counts that and ends the requests
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        state.metrics.latency.labels("/v1/chat/completions" if chat else "/v1/completions").observe(
            time.perf_counter() - started)
