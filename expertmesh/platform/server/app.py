"""The FastAPI app: OpenAI-compatible completions and chat, models, health, metrics, experts, dashboard.

`build_app(engine, settings)` works on any `AsyncEngine`; Ray Serve wraps it as an ingress deployment
(`serve_app.py`), and tests can also run it under plain uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from expertmesh.engine.outputs import RequestOutput
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.platform.expert_health import expert_health
from expertmesh.platform.server import errors
from expertmesh.platform.server.async_engine import AsyncEngine, EngineDead, QueueFull
from expertmesh.platform.server.dashboard import DASHBOARD_HTML
from expertmesh.platform.server.metrics import ServerMetrics
from expertmesh.platform.server.middleware import AuthMiddleware, BodyLimitMiddleware
from expertmesh.platform.server.protocol import ChatCompletionRequest, CompletionRequest
from expertmesh.platform.server.settings import ServerSettings

_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)


class ServerState:
    """What the routes share: the engine, the settings, the metrics."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.llm = engine.engine
        self.tokenizer = self.llm.tokenizer
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.snapshot)

    # -- state read by /metrics, /v1/experts and the dashboard (blocking: call off the event loop) ------
    def load_counts(self, window: bool = True) -> dict[int, list[int]]:
        return {int(k): v for k, v in self.llm.executor.load_counts(window).items()}

    def snapshot(self) -> dict:
        sched = self.llm.scheduler
        blocks = sched.block_manager
        load = self.load_counts(window=True)
        top_k = self.llm.model_config.routing.top_k
        return {
            "running": sched.num_running, "waiting": self.engine.num_waiting(),
            "blocks_used": blocks.num_blocks - blocks.num_free_blocks, "blocks_total": blocks.num_blocks,
            "tokens_per_s": self.engine.stats.tokens_per_second(), "steps": self.engine.stats.steps,
            "load": load, "health": [h.to_dict() for h in expert_health(load, top_k)] if load else [],
        }

    def experts(self) -> dict:
        executor = self.llm.executor
        config = self.llm.model_config
        window = self.load_counts(window=True)
        total = self.load_counts(window=False)
        placement_info = getattr(executor, "placement_info", None)
        if placement_info is not None:
            table = placement_info()
            mode = f"actor graph ({executor.deployment.transport})"
            recoveries = list(executor.recoveries)
        else:  # local mode: every expert in this process
            layers = sorted(total)
            table = {"version": 0, "num_shards": 1, "moe_layers": layers,
                     "replicas": {f"{layer}:{e}": [0] for layer in layers for e in range(config.routing.num_experts)}}
            mode = "local"
            recoveries = []
        top_k = config.routing.top_k
        return {
            "object": "expert_load", "model": self.settings.model_name, "mode": mode,
            "num_experts": config.routing.num_experts, "top_k": top_k,
            "placement": table,
            "load": {"window": {str(k): v for k, v in window.items()},
                     "total": {str(k): v for k, v in total.items()}},
            "health": [h.to_dict() for h in expert_health(window, top_k)] if window else [],
            "recoveries": recoveries,  # what the actor graph did to recover from lost actors
        }

    def unhealthy(self) -> list[str]:
        problems = [] if self.engine.alive else [f"engine stopped: {self.engine.error or 'shut down'}"]
        check = getattr(self.llm.executor, "unhealthy", None)
        if check is not None:
            problems += check()
        return problems

    # -- requests ----------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model not in (self.settings.model_name, self.settings.model):
            raise errors.APIError(404, f"model {model!r} does not exist; this server serves "
                                       f"{self.settings.model_name!r}", param="model", code="model_not_found")

    def sampling_params(self, req, max_tokens: int | None, seed_offset: int, logprobs: int | None) -> SamplingParams:
        limit = self.settings.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
            raise errors.APIError(400, f"{name}={max_tokens} is above this server's limit of {limit}", param=name)
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                top_k=req.top_k or 0, seed=None if req.seed is None else req.seed + seed_offset,
                max_tokens=max_tokens if max_tokens is not None else self.settings.default_max_tokens,
                min_tokens=req.min_tokens, stop=req.stop, ignore_eos=req.ignore_eos, logprobs=logprobs,
            )
        except ValueError as e:
            raise errors.APIError(400, str(e), param=str(e).split()[0]) from None


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


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    state = ServerState(engine, settings)
    app = FastAPI(title="expertmesh", version="0.1.0",
                  description="OpenAI-compatible serving of Mixture-of-Experts LLMs on a Ray actor graph.")
    app.state.server = state
    errors.install(app, _FIELDS)
    # outermost first: keys are checked before the body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, max_depth=settings.max_json_depth)
    if settings.api_keys:
        app.add_middleware(AuthMiddleware, keys=settings.api_keys)
    metrics = state.metrics

    @app.middleware("http")
    async def _count(request: Request, call_next):
        route = request.url.path if request.url.path in _ROUTES else "other"
        start = time.perf_counter()
        metrics.inflight.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.inflight.dec()
        metrics.requests.labels(route, str(response.status_code)).inc()
        if route not in _GENERATE:  # the generate routes observe their own, at their last byte
            metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health() -> Response:
        problems = await asyncio.to_thread(state.unhealthy)
        if problems:
            return errors.error_response(503, "not ready: " + "; ".join(problems))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        llm = state.llm
        card = {"id": settings.model_name, "object": "model", "created": state.created, "owned_by": "expertmesh",
                "root": settings.model, "max_model_len": llm.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/experts")
    async def experts() -> dict:
        return await asyncio.to_thread(state.experts)

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model)
        prompts = body.prompts()
        for i, p in enumerate(prompts):
            if isinstance(p, str) and not p:
                raise errors.APIError(400, f"prompt[{i}] is empty" if len(prompts) > 1 else "prompt is empty",
                                      param="prompt")
        engine_prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
        return await _generate(state, request, body, engine_prompts, "prompt", body.max_tokens, body.logprobs,
                               chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        tok = state.tokenizer
        try:
            text = tok.apply_chat_template(messages)
        except ValueError as e:
            raise errors.APIError(400, f"messages: {e}", param="messages") from None
        # the template writes the special tokens itself, as LLM.chat does
        prompt = {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _generate(state, request, body, [prompt], "messages", body.token_limit(), logprobs, chat=True)

    return app


_ROUTES = {"/health", "/v1/models", "/metrics", "/v1/experts", "/dashboard", "/v1/completions",
           "/v1/chat/completions"}
_GENERATE = {"/v1/completions", "/v1/chat/completions"}


async def _generate(state: ServerState, request: Request, body, prompts: list, prompt_field: str,
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


def _observe_token(state: ServerState, choice: _Choice, out: RequestOutput, started: float, last_t: list) -> None:
    now = time.perf_counter()
    n = len(out.outputs[0].token_ids)
    if choice.last is None:
        choice.prompt_tokens = len(out.prompt_token_ids)
        state.metrics.prompt_tokens.inc(choice.prompt_tokens)
        state.metrics.ttft.observe(now - started)
    elif n > (len(choice.last.outputs[0].token_ids)):
        state.metrics.itl.observe(now - last_t[0])
    state.metrics.generation_tokens.inc(n - (len(choice.last.outputs[0].token_ids) if choice.last else 0))
    last_t[0] = now
    choice.last = out


async def _drain(state: ServerState, choices: list[_Choice], started: float) -> None:
    async def one(choice: _Choice):
        last_t = [started]
        async for out in choice.outputs:
            _observe_token(state, choice, out, started, last_t)

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
    last_t = {c.index: [started] for c in choices}
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
            _observe_token(state, choice, out, started, last_t[choice.index])
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
