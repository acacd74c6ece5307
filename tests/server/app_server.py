"""An in-process server for tests that do not need Ray: the real FastAPI app over a real engine, under
uvicorn on 127.0.0.1 in a background thread. The Ray Serve tests use `expertmesh serve` instead."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn

from expertmesh.engine.llm_engine import EngineConfig, LLMEngine
from expertmesh.platform.server.app import build_app
from expertmesh.platform.server.async_engine import AsyncEngine
from expertmesh.platform.server.settings import ServerSettings

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model_dir, *, api_keys=(API_KEY,), engine_kwargs=None, executor=None, **settings_kwargs):
    """Yields (base_url, AsyncEngine); stops the server and the engine afterwards, even on failure.
    `executor`: the engine's executor factory (default: local mode)."""
    settings = ServerSettings(model=str(model_dir), api_keys=tuple(api_keys), **settings_kwargs)
    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(model_dir), **(engine_kwargs or {})), executor),
                         max_waiting=settings.max_waiting, retry_after_s=settings.retry_after_s)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(15)
        engine.shutdown()
