"""Turning a completion or chat request into engine requests and its answer: one JSON body, or server-sent
events as tokens come (stop strings held back, usage and logprobs), aborting the engine requests however
the response ends."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import StreamingResponse

from expertmesh.engine.outputs import RequestOutput
from expertmesh.platform.server import errors
from expertmesh.platform.server.async_engine import AsyncEngine, EngineDead, QueueFull

if TYPE_CHECKING:
    from expertmesh.platform.server.app import ServerState


@dataclass
class _Choice:
    """One sub-request (a prompt x one of n) and what has been sent of it."""

    index: int
    request_id: str
    outputs: AsyncIterator[RequestOutput]
    sent_chars: int = 0
    sent_tokens: int = 0
    prompt_tokens: int = 0
    last: RequestOutput | None = None
    last_time: float = 0.0  # perf_counter of its latest output, for inter-token latency



async def generate(state: ServerState, request: Request, body, prompts: list, prompt_field: str,
                    max_tokens: int | None, logprobs: int | None, *, chat: bool):
    """Submits every prompt x n, then answers in one JSON body or as server-sent events."""
    started = time.perf_counter()
    engine = state.engine
    choices: list[_Choice] = []
    try:
        for p_index, prompt in enumerate(prompts):
            for j in range(body.n):
                params = state.sampling_params(body, max_tokens, j, logprobs)
                rid = engine.new_request_id("chat" if chat else "cmpl")
                try:
                    outputs = await engine.generate(rid, prompt, params)
                except (ValueError, TypeError) as e:
                    message = str(e).replace("prompts[0]", prompt_field if len(prompts) == 1 else
                                             f"{prompt_field}[{p_index}]")
                    raise errors.APIError(400, message, param=prompt_field) from None
                choices.append(_Choice(index=len(choices), request_id=rid, outputs=outputs))
    except QueueFull as e:
        state.metrics.rejected.inc()
        await _close(choices, engine)
        raise errors.APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
    except EngineDead as e:
        await _close(choices, engine)
        raise errors.APIError(503, str(e)) from None
    except BaseException:
        await _close(choices, engine)
        raise
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(state, body, choices, response_id, started, chat, include_usage)
        return _EventStream(events, choices, engine)
    try:
        await _drain(state, choices, started)
    except EngineDead as e:
        raise errors.APIError(503, str(e)) from None
    except asyncio.CancelledError:
        state.metrics.cancelled.inc()
        raise
    finally:
        await _close(choices, engine)
    state.metrics.latency.labels("/v1/chat/completions" if chat else "/v1/completions").observe(
        time.perf_counter() - started)
    return _full_response(state, body, choices, response_id, chat)


async def _close(choices: list[_Choice], engine: AsyncEngine | None = None) -> None:
    """Ends every choice's output stream, which aborts a request that has not finished. A stream never
    iterated runs no cleanup when closed, so with `engine` the unfinished requests are aborted by id too."""
    for c in choices:
        await c.outputs.aclose()
        if engine is not None and (c.last is None or not c.last.finished):
            engine.abort(c.request_id)  # a no-op for a request already gone


class _EventStream(StreamingResponse):
    """Server-sent events that abort their requests however the response ends: a client that leaves before
    the first event cancels the response before its generator ever runs, and so before its `finally`."""

    def __init__(self, events, choices: list[_Choice], engine: AsyncEngine):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._choices, self._engine = choices, engine

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self._choices, self._engine)


def _observe_token(state: ServerState, choice: _Choice, out: RequestOutput, started: float) -> None:
    now = time.perf_counter()
    n = len(out.outputs[0].token_ids)
    if choice.last is None:
        choice.prompt_tokens = len(out.prompt_token_ids)
        state.metrics.prompt_tokens.inc(choice.prompt_tokens)
        state.metrics.ttft.observe(now - started)
    elif n > (len(choice.last.outputs[0].token_ids)):
        state.metrics.itl.observe(now - choice.last_time)
    state.metrics.generation_tokens.inc(n - (len(choice.last.outputs[0].token_ids) if choice.last else 0))
    choice.last_time = now
    choice.last = out


async def _drain(state: ServerState, choices: list[_Choice], started: float) -> None:
    async def one(choice: _Choice):
        async for out in choice.outputs:
            _observe_token(state, choice, out, started)

    await asyncio.gather(*(one(c) for c in choices))


def _top_n(body, chat: bool) -> int:
    return (body.top_logprobs or 0) if chat else (body.logprobs or 0)


def _usage(choices: list[_Choice], n: int) -> dict:
    """Token counts; like OpenAI, a prompt's tokens count once however many completions it has."""
    prompt = sum(c.prompt_tokens for c in choices if c.index % n == 0)
    completion = sum(len(c.last.outputs[0].token_ids) for c in choices if c.last is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _full_response(state: ServerState, body, choices: list[_Choice], response_id: str, chat: bool) -> dict:
    out_choices = []
    for c in choices:
        comp = c.last.outputs[0]
        lp = None
        if comp.logprobs is not None:
            lp = _logprobs(state, comp.token_ids, comp.logprobs, _top_n(body, chat), chat, 0)
        if chat:
            out_choices.append({"index": c.index, "message": {"role": "assistant", "content": comp.text},
                                "logprobs": lp, "finish_reason": comp.finish_reason})
        else:
            out_choices.append({"index": c.index, "text": comp.text, "logprobs": lp,
                                "finish_reason": comp.finish_reason})
    return {"id": response_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": state.settings.model_name, "choices": out_choices,
            "usage": _usage(choices, body.n)}


def _logprobs(state: ServerState, token_ids: list[int], entries: list[dict[int, float]], top_n: int, chat: bool,
              offset: int, text_offset: int = 0) -> dict:
    """OpenAI's logprobs object for tokens [offset:] of a completion; `top_n` alternatives per token."""
    def text(t: int) -> str:
        return state.tokenizer.decode([t], skip_special_tokens=False)

    ids, rows = token_ids[offset:], entries[offset:]
    tops = [sorted(entry.items(), key=lambda kv: -kv[1])[:top_n] for entry in rows]
    if chat:
        return {"content": [
            {"token": text(t), "logprob": entry[t], "bytes": list(text(t).encode()),
             "top_logprobs": [{"token": text(a), "logprob": v, "bytes": list(text(a).encode())} for a, v in top]}
            for t, entry, top in zip(ids, rows, tops)
        ]}
    tokens = [text(t) for t in ids]
    offsets, pos = [], text_offset
    for piece in tokens:
        offsets.append(pos)
        pos += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": [entry[t] for t, entry in zip(ids, rows)],
        "top_logprobs": [{text(a): v for a, v in top} for top in tops],
        "text_offset": offsets,
    }


def _held_back(body) -> int:
    """Characters kept back while streaming, so a stop string is never half sent before it matches."""
    stops = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
    return max((len(s) for s in stops), default=1) - 1


async def _stream(state: ServerState, body, choices: list[_Choice], response_id: str, started: float, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new text of any choice, a last chunk per choice with its
    finish_reason, the usage chunk when asked, then `data: [DONE]`."""
    created = int(time.time())
    model = state.settings.model_name
    kind = "chat.completion.chunk" if chat else "text_completion"
    hold = _held_back(body)
    queue: asyncio.Queue = asyncio.Queue()

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
    completed = False
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
                message = str(out) if isinstance(out, EngineDead) else f"{type(out).__name__}: {out}"
                yield "data: " + json.dumps(errors.error_body(503, message)) + "\n\n"
                return
            _observe_token(state, choice, out, started)
            comp = out.outputs[0]
            end = len(comp.text) if out.finished else max(choice.sent_chars, len(comp.text) - hold)
            delta = comp.text[choice.sent_chars:end]
            new_tokens = len(comp.token_ids) - choice.sent_tokens
            lp = None
            if comp.logprobs is not None and new_tokens > 0:
                lp = _logprobs(state, comp.token_ids, comp.logprobs, _top_n(body, chat), chat, choice.sent_tokens,
                               choice.sent_chars)
            if delta or out.finished or lp is not None:
                finish = comp.finish_reason if out.finished else None
                if chat:
                    piece = {"index": choice.index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                             "finish_reason": finish}
                else:
                    piece = {"index": choice.index, "text": delta, "logprobs": lp, "finish_reason": finish}
                yield chunk(piece)
                choice.sent_chars = end
                choice.sent_tokens = len(comp.token_ids)
        if include_usage:
            yield "data: " + json.dumps({"id": response_id, "object": kind, "created": created, "model": model,
                                         "choices": [], "usage": _usage(choices, body.n)}) + "\n\n"
        yield "data: [DONE]\n\n"
        completed = True
    finally:
        if not completed:
            state.metrics.cancelled.inc()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close(choices, state.engine)
        state.metrics.latency.labels("/v1/chat/completions" if chat else "/v1/completions").observe(
            time.perf_counter() - started)
