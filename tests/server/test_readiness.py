"""Readiness and the routes that ask the executor: `/health` served from a check at most a second old (a
burst of probes pings the actors once), red after repeated failed steps and green again after one that
works; `/v1/experts` answers 503 and `/metrics` still renders when the executor's counter does not answer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

from expertmesh.engine.executor import ExecutorUnavailable, LocalExecutor
from expertmesh.platform.server.health import HealthCache
from tests.server.app_server import API_KEY, running_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}


class ProbedExecutor:
    """Local mode, with switches: steps that fail, a counter that does not answer, and a count of the health
    checks that reached it."""

    def __init__(self, spec):
        self.inner = LocalExecutor.build(spec)
        self.device, self.mode, self.placement = self.inner.device, "probed", self.inner.placement
        self.recoveries: list[str] = []
        self.failing = threading.Event()
        self.unavailable = threading.Event()
        self.health_checks = 0

    def execute(self, batch, *, all_logits=False):
        if self.failing.is_set():
            raise RuntimeError("expert shard 1 unreachable")
        return self.inner.execute(batch, all_logits=all_logits)

    def load_counts(self, window=False):
        if self.unavailable.is_set():
            raise ExecutorUnavailable("the router's load counts: no answer within 10 s")
        return self.inner.load_counts(window)

    def health(self):
        self.health_checks += 1
        time.sleep(0.05)  # pinging actors takes a moment
        return []

    def shutdown(self):
        self.inner.shutdown()


def probed_app(model_dir):
    made = []

    def factory(spec):
        made.append(ProbedExecutor(spec))
        return made[0]

    return running_app(model_dir, executor=factory), made


def test_a_burst_of_probes_shares_one_check_a_second():
    checks = []
    cache = HealthCache(lambda: checks.append(1) or ["router (no answer)"], max_age_s=1.0)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: cache.get(), range(200)))
    assert all(r == ["router (no answer)"] for r in results) and len(checks) == 1
    time.sleep(1.1)
    assert cache.get() == ["router (no answer)"] and len(checks) == 2  # older than a second: checked again


def test_health_is_cached_red_after_failed_steps_and_green_after_one_that_works(tiny_model_dir):
    model = Path(tiny_model_dir).name
    app, made = probed_app(tiny_model_dir)
    with app as (url, _):
        executor = made[0]
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: httpx.get(url + "/health", timeout=30).status_code, range(40)))
        elapsed = time.monotonic() - start
        # one check per second at most, however many probes came meanwhile
        assert codes == [200] * 40 and executor.health_checks <= int(elapsed) + 1 < 40

        body = {"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0}
        executor.failing.set()
        for _ in range(2):  # two steps in a row fail, each with its request
            assert httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60).status_code == 503
        time.sleep(1.1)  # past the cached result
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 503 and health.json() == {"status": "unhealthy"}  # no key: no details
        health = httpx.get(url + "/health", headers=AUTH, timeout=30)
        assert health.status_code == 503 and "the last 2 steps failed" in health.json()["problems"]

        executor.failing.clear()
        assert httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60).status_code == 200
        time.sleep(1.1)
        assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_an_executor_that_does_not_answer_gets_503_on_experts_and_metrics_go_on(tiny_model_dir, caplog):
    app, made = probed_app(tiny_model_dir)
    with app as (url, _):
        made[0].unavailable.set()
        r = httpx.get(url + "/v1/experts", headers=AUTH, timeout=30)
        assert r.status_code == 503 and r.headers["x-request-id"] in r.json()["error"]["message"]
        assert "no answer within 10 s" not in r.text and "no answer within 10 s" in caplog.text  # the log has it
        metrics = httpx.get(url + "/metrics", headers=AUTH, timeout=30)
        assert metrics.status_code == 200 and "expertmesh_requests_running" in metrics.text
        assert "expertmesh_expert_tokens{" not in metrics.text  # no stale figures: none this scrape
        made[0].unavailable.clear()
        assert httpx.get(url + "/v1/experts", headers=AUTH, timeout=30).status_code == 200


def test_serves_liveness_check_restarts_a_replica_only_after_a_run_of_failed_steps():
    """Ray Serve restarts a replica whose `check_health` raises: a dead actor alone must not (recovery
    replaces it without dropping open streams), a stopped engine or five failed steps in a row must."""
    from types import SimpleNamespace

    from expertmesh.platform.server.serve_app import RESTART_AFTER_FAILED_STEPS, ExpertmeshServer

    replica = object.__new__(ExpertmeshServer)  # its __init__ would build an engine
    replica.engine = SimpleNamespace(alive=True, error=None, stats=SimpleNamespace(failed_in_a_row=0))
    replica.check_health()
    replica.engine.stats.failed_in_a_row = RESTART_AFTER_FAILED_STEPS - 1
    replica.check_health()
    replica.engine.stats.failed_in_a_row = RESTART_AFTER_FAILED_STEPS
    with pytest.raises(RuntimeError, match="the last 5 steps failed"):
        replica.check_health()
    replica.engine = SimpleNamespace(alive=False, error="boom", stats=SimpleNamespace(failed_in_a_row=0))
    with pytest.raises(RuntimeError, match="engine stopped: boom"):
        replica.check_health()
