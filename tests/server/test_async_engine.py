"""The engine thread: a failed step fails only the requests in it (503, OpenAI error shape, or an SSE error
event), and the server keeps answering; shutdown fails what is still waiting instead of hanging it."""

from __future__ import annotations

import asyncio
import json
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


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(tiny_model_dir):
    model = Path(tiny_model_dir).name
    with running_app(tiny_model_dir) as (url, engine):
        _fail_step(engine, 1, "shard lost beyond recovery")
        body = {"model": model, "prompt": "hello", "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 503
        assert "shard lost beyond recovery" in r.json()["error"]["message"]
        # the next request, streamed, runs normally on the same engine
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                          timeout=60) as s:
            events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "stop")
        assert engine.engine.scheduler.block_manager.num_free_blocks == engine.engine.scheduler.block_manager.num_blocks


def test_a_step_failing_mid_stream_sends_an_error_event(tiny_model_dir):
    model = Path(tiny_model_dir).name
    with running_app(tiny_model_dir) as (url, engine):
        _fail_step(engine, 3, "router gone")
        body = {"model": model, "prompt": "hello", "max_tokens": 20, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as s:
            assert s.status_code == 200
            events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
        last = json.loads(events[-1])
        assert "router gone" in last["error"]["message"] and last["error"]["type"] == "service_unavailable"
        assert httpx.get(url + "/health", timeout=30).status_code == 200


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
