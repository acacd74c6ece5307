"""A client that goes away mid-stream is counted as cancelled and its request is aborted when the response
ends, not when the garbage collector happens to finalise the event generator.

Starlette leaves a generator whose `send` was cancelled suspended at its `yield`; its `finally` runs only
when the generator is collected, which a kept traceback or a reference cycle can put off indefinitely (the
Ray Serve test saw the cache freed but `expertmesh_requests_cancelled_total` still 0). The ASGI app is driven
directly here so that the check runs before the event loop gets a chance to finalise anything."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from types import SimpleNamespace

from expertmesh.engine.llm_engine import EngineConfig, LLMEngine
from expertmesh.platform.server.app import build_app
from expertmesh.platform.server.async_engine import AsyncEngine
from expertmesh.platform.server.generation import _Choice, _EventStream
from expertmesh.platform.server.metrics import ServerMetrics
from expertmesh.platform.server.settings import ServerSettings


def _scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


async def _leave_after(app, body: dict, chunks: int) -> list[bytes]:
    """Sends `body`, takes `chunks` body chunks, then stops reading (the next `send` never returns, like a full
    socket) and cancels the request the way Ray Serve's proxy does when its client disconnects. Returns the
    chunks taken."""
    request = json.dumps(body).encode()
    got: list[bytes] = []
    enough = asyncio.Event()
    asked = False

    async def receive():
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": request, "more_body": False}
        await asyncio.Event().wait()  # the client says nothing more; it just goes

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            if len(got) == chunks:
                enough.set()
                await asyncio.Event().wait()  # cancelled there, with the event generator at a `yield`
            got.append(message["body"])

    task = asyncio.create_task(app(_scope("/v1/completions"), receive, send))
    await asyncio.wait_for(enough.wait(), 60)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return got


def test_a_client_leaving_mid_stream_is_counted_and_aborted_when_the_response_ends(tiny_model_dir):
    model = Path(tiny_model_dir).name
    settings = ServerSettings(model=str(tiny_model_dir), api_keys=())
    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_model_dir))))
    try:
        app = build_app(engine, settings)
        registry = app.state.server.metrics.registry
        body = {"model": model, "prompt": "a long answer please", "max_tokens": 2000, "temperature": 0,
                "stream": True, "ignore_eos": True}

        async def scenario():
            got = await _leave_after(app, body, chunks=3)
            # no await between the response's end and these reads: nothing was left for a finaliser to do
            cancelled = registry.get_sample_value("expertmesh_requests_cancelled_total")
            return got, cancelled

        got, cancelled = asyncio.run(scenario())
        assert len(got) == 3 and all(c.startswith(b"data: ") for c in got)
        assert cancelled == 1
        # the abort reaches the engine thread: the request leaves and its blocks are freed
        assert asyncio.run(_wait_idle(engine)), "the engine still holds the request or its blocks"
    finally:
        engine.shutdown()


async def _wait_idle(engine: AsyncEngine, timeout_s: float = 30.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        used = await engine.run_in_engine(lambda e: (e.has_unfinished_requests(),
                                                     e.scheduler.block_manager.num_blocks
                                                     - e.scheduler.block_manager.num_free_blocks))
        if used == (False, 0):
            return True
        await asyncio.sleep(0.05)
    return False


def test_the_event_stream_closes_its_generator_itself_when_cancelled_at_a_send():
    """The generator is still referenced (as a kept traceback would hold it), so only the response's own close
    can run its `finally` before the response ends."""
    closed: list[str] = []

    async def events():
        try:
            while True:
                yield "data: {}\n\n"
        finally:
            closed.append("events")

    async def outputs():
        try:
            while True:
                yield None
                await asyncio.sleep(3600)
        finally:
            closed.append("outputs")

    aborted: list[str] = []
    state = SimpleNamespace(metrics=ServerMetrics(lambda: {}), engine=SimpleNamespace(abort=aborted.append))
    gen, out = events(), outputs()
    choice = _Choice(index=0, request_id="r-1", outputs=out)

    async def scenario():
        await anext(out)  # the engine's stream is live, as a pump would have it
        sent = asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                sent.set()
                await asyncio.Event().wait()  # a full socket: the cancel lands here

        async def receive():
            await asyncio.Event().wait()

        task = asyncio.create_task(_EventStream(state, gen, [choice])(_scope("/v1/completions"), receive, send))
        await sent.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return list(closed), state.metrics.registry.get_sample_value("expertmesh_requests_cancelled_total")

    seen, cancelled = asyncio.run(scenario())
    assert seen == ["events", "outputs"]  # the generator first, so that its own cleanup runs before the abort
    assert cancelled == 1 and aborted == ["r-1"]
