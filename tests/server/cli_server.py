"""The real server for tests: `python -m expertmesh serve` in a subprocess, on 127.0.0.1.

`cli_server(...)` yields once the app answers and, on the way out (also when the test failed), sends
SIGTERM and checks that the server and every process it started are gone within the 60 s the CLI
promises; whatever is left is killed so no test leaks a Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from tests.server.app_server import free_port

START_TIMEOUT_S = 240
STOP_DEADLINE_S = 60
REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url
        self.lines: list[str] = []
        self.stop_seconds: float | None = None
        self.leftover: list[str] = []

    def output(self) -> str:
        return "".join(self.lines)


def _reader(server: ServerProcess) -> None:
    for line in server.proc.stdout:
        server.lines.append(line)


@contextmanager
def cli_server(model_dir, *extra: str, env: dict[str, str] | None = None, api_key: str | None = "serve-test-key"):
    port = free_port()
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if api_key is not None:
        environ["EXPERTMESH_API_KEY"] = api_key
    environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cmd = [sys.executable, "-m", "expertmesh", "serve", "--model", str(model_dir), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}")
    threading.Thread(target=_reader, args=(server,), daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "is serving" not in server.output():
            if proc.poll() is not None:
                raise RuntimeError(f"expertmesh serve exited with {proc.returncode}:\n{server.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"expertmesh serve not ready after {START_TIMEOUT_S} s:\n{server.output()[-4000:]}")
            time.sleep(0.2)
        yield server
    finally:
        _stop(server)


def _stop(server: ServerProcess) -> None:
    proc = server.proc
    try:
        me = psutil.Process(proc.pid)
        family = [me] + me.children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    start = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        pass
    # the processes the server started (Ray's raylet, GCS, workers) may take a moment more to exit
    alive = [p for p in family if _running(p)]
    while alive and time.monotonic() - start < STOP_DEADLINE_S:
        time.sleep(0.5)
        alive = [p for p in alive if _running(p)]
    server.stop_seconds = time.monotonic() - start
    server.leftover = [f"{p.pid} {_name(p)}" for p in alive]
    for p in alive:  # never leak them into the next test, whatever the verdict
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _running(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(p) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"
