"""The engine thread: a failed step fails only the requests in it (503, OpenAI error shape, or an SSE error
event) and the server keeps answering; clients are told a generic message with their request id while the
details go to the server log; shutdown fails what is still waiting instead of hanging it."""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

from expertmesh.engine.llm_engine import EngineConfig, LLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.platform.server.async_engine import AsyncEngine, EngineDead
from tests.server.app_server import API_KEY, running_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _fail_step(engine: AsyncEngine, call: int, message: str) -> None:
    """Makes the engine's `call`-th step from now raise RuntimeError(message); the others run normally."""
    real_step, calls = engine.engine.step, []

    def step():
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(message)
        return real_step()

    engine.engine.step = step


def _assert_generic(error: dict, request_id: str, caplog, secret: str) -> None:
    """The client's error names the request id and nothing of what failed; the log has both."""
    assert request_id in error["message"] and secret not in json.dumps(error)
    assert error["type"] == "service_unavailable" and error["code"] == "server_error"
    logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert any(secret in line for line in logged), caplog.text[-2000:]


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(tiny_model_dir, caplog):
    model = Path(tiny_model_dir).name
    with running_app(tiny_model_dir) as (url, engine):
        _fail_step(engine, 1, "shard 10.0.3.7:50051 lost: StatusCode.UNAVAILABLE")
        body = {"model": model, "prompt": "hello", "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 503
        _assert_generic(r.json()["error"], r.headers["x-request-id"], caplog, "10.0.3.7:50051")
        # a client's own plain request id is kept, so their logs and ours meet
        with ThreadPoolExecutor(2) as pool:  # two at once with the same id: both are served
            same = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json={**body, "n": 2}, timeout=60,
                                                      headers={**AUTH, "X-Request-Id": "client-42"}), range(2)))
        for r in same:
            assert r.status_code == 200 and r.headers["x-request-id"] == "client-42"
            assert r.json()["id"] == "cmpl-client-42" and len(r.json()["choices"]) == 2
        r = httpx.post(url + "/v1/completions", json=body, headers={**AUTH, "X-Request-Id": "a b;<forged>"}, timeout=60)
        assert r.status_code == 200 and r.headers["x-request-id"] != "a b;<forged>"  # not plain: ours instead
        # the next request, streamed, runs normally on the same engine
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                          timeout=60) as s:
            events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "stop")
        assert engine.engine.scheduler.block_manager.num_free_blocks == engine.engine.scheduler.block_manager.num_blocks


def test_a_step_failing_mid_stream_sends_an_error_event(tiny_model_dir, caplog):
    model = Path(tiny_model_dir).name
    with running_app(tiny_model_dir) as (url, engine):
        _fail_step(engine, 3, "router at 10.0.3.9 gone")
        body = {"model": model, "prompt": "hello", "max_tokens": 20, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as s:
            assert s.status_code == 200
            request_id = s.headers["x-request-id"]
            events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
        _assert_generic(json.loads(events[-1])["error"], request_id, caplog, "10.0.3.9")
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        # a failure is not a client's leaving: the cancelled counter stays at 0
        scrape = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
        assert re.search(r"^expertmesh_requests_cancelled_total 0\.0$", scrape, re.MULTILINE), scrape[-2000:]


def test_shutdown_fails_waiting_requests_instead_of_hanging(tiny_model_dir):
    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_model_dir))))

    async def run():
        outputs = await engine.generate("r1", "hello", SamplingParams(max_tokens=10_000, ignore_eos=True))
        await outputs.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDead, match="shutting down"):
            async for _ in outputs:
                pass
        with pytest.raises(EngineDead):
            await engine.generate("r2", "hello", SamplingParams())

    asyncio.run(asyncio.wait_for(run(), timeout=120))


def test_an_engine_that_cannot_be_built_raises_its_error(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tmp_path / "missing"))))


def _paused_step(engine: AsyncEngine):
    """Makes the engine thread stop inside its next step until the returned `release` is set; `inside` is set
    once it is there. Whatever the event loop queues meanwhile is applied together after that step."""
    import threading

    real_step, inside, release = engine.engine.step, threading.Event(), threading.Event()

    def step():
        if not release.is_set():
            inside.set()
            release.wait(60)
        return real_step()

    engine.engine.step = step
    return inside, release


def test_an_abort_queued_with_its_add_drops_the_add(tiny_model_dir):
    """The ordering the race needs, forced: the client hangs up (its submit is cancelled, which queues an
    abort) while the engine thread is busy, so its add and its abort are both waiting when the thread comes
    back. The add must be dropped, not run to max_tokens with nobody reading."""
    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_model_dir))))
    llm = engine.engine

    async def run():
        first = await engine.generate("A", "hello", SamplingParams(max_tokens=30, ignore_eos=True))
        inside, release = _paused_step(engine)
        assert await asyncio.to_thread(inside.wait, 30)  # the engine thread is inside a step now
        late = asyncio.create_task(engine.generate("B", "hello", SamplingParams(max_tokens=10_000, ignore_eos=True)))
        await asyncio.sleep(0.05)  # B's add is queued, the thread cannot take it
        assert engine.num_waiting() - llm.scheduler.num_waiting == 1  # B's add, queued (the thread is paused)
        late.cancel()  # the client hangs up: B's abort is queued behind its add
        with pytest.raises(asyncio.CancelledError):
            await late
        release.set()
        async for out in first:  # A goes on to its end
            pass
        assert out.finished
        await asyncio.sleep(0.2)  # a few more turns of the engine loop
        return llm.scheduler.num_running + llm.scheduler.num_waiting, llm.scheduler.block_manager.num_free_blocks

    try:
        unfinished, free = asyncio.run(asyncio.wait_for(run(), timeout=120))
        assert unfinished == 0 and not llm.has_unfinished_requests()
        assert free == llm.scheduler.block_manager.num_blocks
        assert engine.stats.aborted_requests == 1
    finally:
        engine.shutdown()


def test_an_unread_stream_holds_one_merged_output_not_one_per_step(tiny_model_dir):
    """A client that stops reading: the engine goes on, and what waits for it is a single output that grows
    by a token per step (memory linear in the output), not a copy of the whole output per step."""
    import tracemalloc

    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_model_dir))))
    tokens = 300

    async def run():
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, logprobs=20, temperature=0.0)
        stream = await engine.submit("R", "hello", params)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        while engine.stats.finished_requests < 1:  # nobody reads until the request has finished
            assert len(stream) <= 1
            await asyncio.sleep(0.05)
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        outs = [out async for out in engine.outputs("R", stream)]
        return held, outs

    try:
        held, outs = asyncio.run(asyncio.wait_for(run(), timeout=300))
    finally:
        engine.shutdown()
    (out,) = outs  # everything since the reader last looked, in one output
    comp = out.outputs[0]
    assert out.finished and len(comp.token_ids) == tokens and len(comp.logprobs) == tokens
    assert all(len(entry) >= 20 for entry in comp.logprobs)
    # ~21 logprob entries a token, a few hundred bytes each: linear, ~0.7 MB here. A copy per step would hold
    # tokens^2 / 2 entries' worth: ~100 MB.
    assert held < 10 * 2**20, f"{held / 2**20:.1f} MiB held for an unread stream of {tokens} tokens"
