"""The FastAPI app: OpenAI-compatible completions and chat, models and LoRA adapters, health, metrics, experts,
dashboard.

`build_app(engine, settings)` works on any `AsyncEngine`; Ray Serve wraps it as an ingress deployment
(`serve_app.py`), and tests can also run it under plain uvicorn.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from expertmesh.engine.executor import Executor, ExecutorUnavailable, PlacementExecutor
from expertmesh.engine.lora_request import LoRARequest
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.experts import expert_health, expert_shares, layer_balancedness, shard_loads
from expertmesh.platform.elastic import ElasticExperts, RebalanceBusy
from expertmesh.platform.server import errors
from expertmesh.platform.server.async_engine import AsyncEngine, EngineDead
from expertmesh.platform.server.dashboard import DASHBOARD_HTML
from expertmesh.platform.server.generation import generate
from expertmesh.platform.server.health import HEALTH_MAX_AGE_S, HealthCache
from expertmesh.platform.server.loop_lag import LoopLagMonitor
from expertmesh.platform.server.lora import ServedAdapters
from expertmesh.platform.server.metrics import ServerMetrics
from expertmesh.platform.server.middleware import AuthMiddleware, BodyLimitMiddleware, has_valid_key
from expertmesh.platform.server.protocol import (ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest,
                                                 RebalanceRequest, ScaleRequest, UnloadLoRAAdapterRequest)
from expertmesh.platform.server.settings import ServerSettings

# Readiness turns red once this many steps in a row have failed (each already retried by the executor).
UNREADY_AFTER_FAILED_STEPS = 2
_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
# A client's X-Request-Id is kept (it ties their logs to ours) when it is this plain; else we make one.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class ServerState:
    """What the routes share: the engine, the settings, the metrics."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, adapters: ServedAdapters | None = None):
        self.engine = engine
        self.settings = settings
        self.adapters = adapters if adapters is not None else ServedAdapters(settings)
        self.llm = engine.engine
        self.executor: Executor = self.llm.executor
        self.tokenizer = self.llm.tokenizer
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.snapshot)
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag.observe)
        self._health = HealthCache(self._check_health, max_age_s=HEALTH_MAX_AGE_S)
        # an actor graph's experts are re-placed while it serves: every rebalance_interval_s, and on request
        self.elastic = (ElasticExperts(self.executor, alive=lambda: engine.alive)
                           if isinstance(self.executor, PlacementExecutor) else None)
        if self.elastic is not None:
            self.elastic.start()

    # -- state read by /metrics, /v1/experts and the dashboard (blocking: call off the event loop) ------
    def load_counts(self, window: bool = True) -> dict[int, list[int]]:
        """Raises ExecutorUnavailable when the executor's counter (the router actor) does not answer in time."""
        return {int(k): v for k, v in self.executor.load_counts(window).items()}

    def snapshot(self) -> dict:
        sched = self.llm.scheduler
        blocks = sched.block_manager
        try:
            load = self.load_counts(window=True)
        except ExecutorUnavailable:  # the engine's own figures still go out; the experts' wait for the next scrape
            load = {}
        top_k = self.llm.model_config.routing.top_k
        table = self.executor.placement
        return {
            "running": sched.num_running, "waiting": self.engine.num_waiting(),
            "blocks_used": blocks.num_blocks - blocks.num_free_blocks, "blocks_total": blocks.num_blocks,
            "tokens_per_s": self.engine.stats.tokens_per_second(), "steps": self.engine.stats.steps,
            "load": load, "health": [h.to_dict() for h in expert_health(load, top_k)] if load else [],
            "placement_version": table.version,
            "balancedness": {layer: layer_balancedness(table, layer, counts) for layer, counts in load.items()},
        }

    def experts(self) -> dict:
        """The placement, the load per expert and per shard, and the health figures: everything the
        dashboard draws, computed here so that the page only displays it."""
        table = self.executor.placement
        top_k = self.llm.model_config.routing.top_k
        load = {"window": self.load_counts(window=True), "total": self.load_counts(window=False)}
        return {
            "object": "expert_load", "model": self.settings.model_name, "mode": self.executor.mode,
            "num_experts": table.num_experts, "top_k": top_k,
            "placement": {"version": table.version, "num_shards": table.num_shards,
                          "moe_layers": list(table.moe_layers), "slots": list(table.slots),
                          "replicas": {f"{layer}:{e}": list(s) for (layer, e), s in sorted(table.replicas.items())}},
            "load": {scope: {str(k): v for k, v in counts.items()} for scope, counts in load.items()},
            # each expert's share of its layer's tokens, and each shard's share of all routed pairs
            "shares": {scope: {str(k): expert_shares(v, top_k) for k, v in counts.items()}
                       for scope, counts in load.items()},
            "shards": {scope: [s.to_dict() for s in shard_loads(table, counts)] for scope, counts in load.items()},
            "health": [h.to_dict() for h in expert_health(load["window"], top_k)] if load["window"] else [],
            "recoveries": list(self.executor.recoveries),  # what the actor graph did to recover from lost actors
            "elastic": self.elastic.status() if self.elastic is not None else None,
        }

    def rebalance(self, force: bool) -> dict:
        return self._elastic(lambda elastic: elastic.rebalance(force=force), "rebalance")

    def scale(self, shards: int) -> dict:
        return self._elastic(lambda elastic: elastic.scale(shards), "scale")

    def _elastic(self, act, what: str) -> dict:
        if self.elastic is None:
            raise errors.APIError(400, f"this server runs the model in {self.executor.mode} mode: its experts are not "
                                       f"on shards, so there is nothing to {what}", code="not_elastic")
        try:
            return act(self.elastic)
        except RebalanceBusy as e:
            raise errors.APIError(409, str(e), code="elastic_change_in_progress") from None
        except ValueError as e:
            raise errors.APIError(400, str(e), param="expert_shards" if what == "scale" else None) from None

    def _check_health(self) -> list[str]:
        problems = [] if self.engine.alive else [f"engine stopped: {self.engine.error or 'shut down'}"]
        failed = self.engine.stats.failed_in_a_row
        if failed >= UNREADY_AFTER_FAILED_STEPS:
            problems.append(f"the last {failed} steps failed")
        return problems + self.executor.health()

    def unhealthy(self) -> list[str]:
        """What is wrong, from a check at most HEALTH_MAX_AGE_S old: probes arriving together share one
        check instead of each pinging every actor."""
        return self._health.get()

    # -- requests ----------------------------------------------------------------------------------
    def check_model(self, model: str) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names (None: the base model); 404 for a model not served."""
        return self.adapters.lookup(model)

    def model_card(self, model_id: str, root: str, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "expertmesh", "root": root,
                "parent": parent, "max_model_len": self.llm.max_model_len}

    def tokenize(self, prompts: list) -> list[dict]:
        """Engine prompts for a completion's prompts (text is tokenized here, in the caller's thread)."""
        return [{"prompt": p, "prompt_token_ids": self.tokenizer.encode(p)} if isinstance(p, str)
                else {"prompt_token_ids": p} for p in prompts]

    def chat_prompt(self, messages: list[dict]) -> dict:
        try:
            text = self.tokenizer.apply_chat_template(messages)
        except ValueError as e:
            raise errors.APIError(400, f"messages: {e}", param="messages") from None
        # the template writes the special tokens itself, as LLM.chat does
        return {"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def check_work(self, num_prompts: int, n: int, max_tokens: int | None, logprobs: int | None,
                   max_tokens_field: str, logprobs_field: str) -> None:
        """Refuses a request whose answer could exceed `max_request_work` token entries: prompts x n x
        max_tokens x (1 + logprobs alternatives). Each entry costs engine time, memory while it is held and
        a share of the answer's bytes; the cap keeps one request from taking the server for minutes."""
        tokens = max_tokens if max_tokens is not None else self.settings.default_max_tokens
        if tokens > self.settings.max_tokens_limit:
            return  # refused with its own message when the sampling parameters are made
        per_token = 1 + (logprobs or 0)
        work = num_prompts * n * tokens * per_token
        limit = self.settings.max_request_work
        if work > limit:
            raise errors.APIError(
                400, f"this request asks for up to {work} tokens of work (prompts {num_prompts} x n {n} x "
                     f"{max_tokens_field} {tokens} x (1 + {logprobs_field} {logprobs or 0})), above this server's "
                     f"limit of {limit}; send fewer prompts or lower n, {max_tokens_field} or {logprobs_field}",
                param=max_tokens_field, code="request_too_large")

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


def build_app(engine: AsyncEngine, settings: ServerSettings, *, adapters: ServedAdapters | None = None,
              echo_request_id: bool = True) -> FastAPI:
    """`adapters`: the LoRA adapters served (default: those of `settings`, loaded when first named).
    `echo_request_id=False` behind Ray Serve, whose proxy gives every request an `x-request-id` (the
    client's, or one it makes) and echoes it on the response itself."""
    state = ServerState(engine, settings, adapters)
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
        state.loop_lag.ensure_running()
        route = request.url.path if request.url.path in _ROUTES else "other"
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        start = time.perf_counter()
        metrics.inflight.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.inflight.dec()
        if echo_request_id:
            response.headers["X-Request-Id"] = request.state.request_id
        metrics.requests.labels(route, str(response.status_code)).inc()
        if route not in _GENERATE:  # the generate routes observe their own, at their last byte
            metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health(request: Request) -> Response:
        """Readiness, for load balancers and probes, which send no key: ok or unhealthy. What is wrong (the
        engine's error, which actor does not answer) only for a caller with a key, or on a server without."""
        problems = await asyncio.to_thread(state.unhealthy)
        if not problems:
            return JSONResponse({"status": "ok"})
        body: dict = {"status": "unhealthy"}
        if not settings.api_keys or has_valid_key(request.headers, settings.api_keys):
            body["problems"] = problems
        return JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models() -> dict:
        """The base model, then each LoRA adapter served, whose `parent` is the base model (as vLLM lists them)."""
        cards = [state.model_card(settings.model_name, settings.model, None)]
        cards += [state.model_card(r.lora_name, r.lora_path, settings.model_name) for r in state.adapters.known]
        return {"object": "list", "data": cards}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> dict:
        """Serves a LoRA adapter under a new model name (behind the API key; needs --lora-dirs): checked whole
        and loaded into a slot before the answer, so a bad adapter gets a 400 naming what does not fit."""
        try:
            lora, new = await state.adapters.load(engine, body.lora_name, body.lora_path)
        except EngineDead as e:
            raise errors.server_failure(request.state.request_id, e) from None
        return {**state.model_card(lora.lora_name, lora.lora_path, settings.model_name), "loaded": new}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> dict:
        """Stops serving an adapter (behind the API key; needs --lora-dirs): new requests naming it get 404,
        the ones running finish with it, and its slot is freed when they have."""
        try:
            running = await state.adapters.unload(engine, body.lora_name)
        except EngineDead as e:
            raise errors.server_failure(request.state.request_id, e) from None
        return {"id": body.lora_name, "object": "model", "deleted": True, "running_requests": running}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/experts")
    async def experts(request: Request) -> dict:
        try:
            return await asyncio.to_thread(state.experts)
        except ExecutorUnavailable as e:
            raise errors.server_failure(request.state.request_id, e) from None

    @app.post("/v1/experts/rebalance")
    async def rebalance_experts(request: Request, body: RebalanceRequest | None = None) -> dict:
        """Rebalances the experts now (behind the API key): the decision, and the swap it started if any."""
        try:
            return await asyncio.to_thread(state.rebalance, body.force if body is not None else False)
        except ExecutorUnavailable as e:
            raise errors.server_failure(request.state.request_id, e) from None

    @app.post("/v1/experts/scale")
    async def scale_experts(body: ScaleRequest, request: Request) -> dict:
        """Runs `expert_shards` shards from the next swap on (behind the API key): the change it started."""
        try:
            return await asyncio.to_thread(state.scale, body.expert_shards)
        except (ExecutorUnavailable, TimeoutError) as e:
            raise errors.server_failure(request.state.request_id, e) from None

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The page holds no data (it fetches /v1/experts with the key given in its address's fragment), so it
        needs no key itself; its address never goes to another site (no referrer)."""
        return HTMLResponse(DASHBOARD_HTML, headers={"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        lora = state.check_model(body.model)
        prompts = body.prompts()
        for i, p in enumerate(prompts):
            if isinstance(p, str) and not p:
                raise errors.APIError(400, f"prompt[{i}] is empty" if len(prompts) > 1 else "prompt is empty",
                                      param="prompt")
        state.check_work(len(prompts), body.n, body.max_tokens, body.logprobs, "max_tokens", "logprobs")
        engine_prompts = await asyncio.to_thread(state.tokenize, prompts)  # off the event loop: prompts can be long
        return await generate(state, request, body, engine_prompts, "prompt", body.max_tokens, body.logprobs,
                               chat=False, lora_request=lora)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        lora = state.check_model(body.model)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        state.check_work(1, body.n, body.token_limit(), logprobs, max_field, "top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = await asyncio.to_thread(state.chat_prompt, messages)  # the template and tokenizer: off the loop
        return await generate(state, request, body, [prompt], "messages", body.token_limit(), logprobs, chat=True,
                              lora_request=lora)

    return app


_ROUTES = {"/health", "/v1/models", "/metrics", "/v1/experts", "/v1/experts/rebalance", "/v1/experts/scale",
           "/dashboard", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
_GENERATE = {"/v1/completions", "/v1/chat/completions"}
