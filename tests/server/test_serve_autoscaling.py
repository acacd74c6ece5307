"""Serve replicas of `expertmesh serve`: a fixed `--replicas` count, or Ray Serve's autoscaling between
`--min-replicas` and `--max-replicas`, in the deployment `expertmesh serve` runs and in the Serve config it
prints; and, on a local Ray, load that adds a second replica and idleness that takes it away again."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import ray
import yaml
from ray import serve
from ray.serve.config import AutoscalingConfig
from ray.serve.context import _disconnect, _get_global_client
from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails

from expertmesh.graph.runtime import ACTOR_NAMESPACE
from expertmesh.platform.server.runner import _cluster_cpus
from expertmesh.platform.server.serve_app import APP_NAME, DEPLOYMENT_NAME, build_application
from expertmesh.platform.server.settings import (
    DOWNSCALE_DELAY_S,
    UPSCALE_DELAY_S,
    ReplicaScaling,
    ServerSettings,
)
from tests.server.app_server import free_port
from tests.server.cli_server import REPO, cli_server

KEY = "autoscaling-test-key"


def _printed(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "expertmesh", "serve", *args, "--print-serve-config"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return yaml.safe_load(out)


def test_printed_config_carries_serves_autoscaling_config(tiny_model_dir):
    """min/max go into the application's `deployments:` entry (where Serve changes them without restarting
    a replica), aimed at the engine's batch by default, and Ray Serve's own schema accepts the file."""
    config = _printed("--model", str(tiny_model_dir), "--min-replicas", "1", "--max-replicas", "4",
                      "--max-num-seqs", "16", "--autoscaling-config", '{"downscale_delay_s": 120}')
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    assert deployment == {"name": DEPLOYMENT_NAME, "autoscaling_config": {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16, "upscale_delay_s": UPSCALE_DELAY_S,
        "downscale_delay_s": 120}}
    AutoscalingConfig(**deployment["autoscaling_config"])


def test_printed_config_defaults(tiny_model_dir):
    """No flag: one replica, as before. --max-replicas alone: from 1, aimed at EngineConfig's batch (64)."""
    (app,) = _printed("--model", str(tiny_model_dir))["applications"]
    assert app["deployments"] == [{"name": DEPLOYMENT_NAME, "num_replicas": 1}]
    (app,) = _printed("--model", str(tiny_model_dir), "--replicas", "3")["applications"]
    assert app["deployments"] == [{"name": DEPLOYMENT_NAME, "num_replicas": 3}]
    (app,) = _printed("--model", str(tiny_model_dir), "--max-replicas", "2")["applications"]
    assert app["deployments"][0]["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64, "upscale_delay_s": UPSCALE_DELAY_S,
        "downscale_delay_s": DOWNSCALE_DELAY_S}


def test_the_deployment_expertmesh_serve_runs_scales_as_told(tiny_model_dir):
    settings = ServerSettings(model=str(tiny_model_dir), api_keys=("k",))
    fixed = build_application(settings)._bound_deployment
    assert fixed.num_replicas == 1 and fixed._deployment_config.autoscaling_config is None
    assert build_application(settings, scaling=ReplicaScaling(replicas=3))._bound_deployment.num_replicas == 3
    scaling = ReplicaScaling(min_replicas=2, max_replicas=5, target_ongoing_requests=8,
                             autoscaling={"look_back_period_s": 20})
    autoscaled = build_application(settings, scaling=scaling)._bound_deployment._deployment_config.autoscaling_config
    assert (autoscaled.min_replicas, autoscaled.max_replicas) == (2, 5)
    assert (autoscaled.target_ongoing_requests, autoscaled.look_back_period_s) == (8, 20)
    assert (autoscaled.upscale_delay_s, autoscaled.downscale_delay_s) == (UPSCALE_DELAY_S, DOWNSCALE_DELAY_S)


def test_a_private_ray_has_room_for_the_most_replicas(tiny_model_dir):
    """Each replica, with the actors of its own graph, must fit the Ray that `expertmesh serve` starts."""
    graph = {"attention_actors": 1, "expert_shards": 2, "transport": "grpc",
             "attention_resources": {"num_cpus": 2}, "router_resources": {"num_cpus": 1},
             "shard_resources": {"num_cpus": 1}}  # 5 CPUs a graph, 1 the replica
    settings = ServerSettings(model=str(tiny_model_dir), deployment=graph)
    assert _cluster_cpus(settings, ReplicaScaling(min_replicas=1, max_replicas=3)) == 18
    assert _cluster_cpus(settings, ReplicaScaling()) == 6
    assert _cluster_cpus(ServerSettings(model=str(tiny_model_dir)), ReplicaScaling(replicas=2)) == 2


# -- on a local Ray: each test starts a cluster of its own and takes it down, whatever the outcome -------------

@pytest.fixture
def cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        # Serve caches its controller's handle by job id, and every fresh cluster's first driver has the same
        # one: forget it, or the next test's cluster is asked about this one's dead controller
        _disconnect()
        ray.shutdown()


def _deployment():
    """The deployment as Serve's controller reports it (what `serve status` and the dashboard show)."""
    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    return details.applications[APP_NAME].deployments[DEPLOYMENT_NAME]


def _running(deployment) -> int:
    return sum(r.state == "RUNNING" for r in deployment.replicas)


def _wait_for(what: str, predicate, timeout_s: float, server=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if server is not None and server.proc.poll() is not None:
            raise AssertionError(f"expertmesh serve exited while waiting for {what}:\n{server.output()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:g} s")


@pytest.mark.slow
def test_printed_config_deploys_with_serves_own_tools(cluster, tiny_model_dir, tmp_path):
    """`serve run` of the printed file: Serve's merge of our `deployments:` entry into what `app_builder`
    builds gives the deployment the autoscaling config, as Serve reports it."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(_printed(
        "--model", str(tiny_model_dir), "--no-api-key", "--port", str(port), "--min-replicas", "1",
        "--max-replicas", "3", "--target-ongoing-requests", "5")))
    serve_cli = Path(sys.executable).with_name("serve")
    try:
        r = subprocess.run([str(serve_cli), "run", str(config), "--non-blocking", "--address", cluster],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        _wait_for("the app running", lambda: serve.status().applications[APP_NAME].status == "RUNNING", 240)
        d = _deployment()
        scaling = d.deployment_config.autoscaling_config
        assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 3, 5)
        assert _running(d) == 1
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=60).status_code == 200
    finally:
        serve.shutdown()


async def _load(url: str, model: str, *, workers: int, budget: int, stop: asyncio.Event) -> list[httpx.Response]:
    """`workers` requests at a time, each sent as the last came back, until `stop` is set or `budget` requests
    have gone out; every response, in the order they came back."""
    sent, answers = 0, []

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        nonlocal sent
        while not stop.is_set() and sent < budget:
            sent += 1
            body = {"model": model, "prompt": f"load {w}: experts", "max_tokens": 512, "temperature": 0,
                    "ignore_eos": True}
            answers.append(await client.post(url + "/v1/completions", json=body,
                                             headers={"Authorization": f"Bearer {KEY}"}))

    async with httpx.AsyncClient(timeout=240) as client:
        await asyncio.gather(*(worker(client, w) for w in range(workers)))
    return answers


@pytest.mark.slow
def test_load_adds_a_replica_and_idleness_takes_it_away(cluster, tiny_model_dir):
    """min 1, max 2, a batch of 2 sequences (so the target is 2 ongoing requests a replica): 8 requests at a
    time make Serve start a second replica, every request succeeds, and once idle Serve is back to one."""
    # Serve pushes its load metrics every `metrics_interval_s` (10 s unless told; Ray 2.60 still reads this
    # deprecated field, not the environment variables its warning names): twice a second here, so that the
    # short delays mean what they say
    fast = {"upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2, "metrics_interval_s": 0.5}
    with cli_server(tiny_model_dir, "--min-replicas", "1", "--max-replicas", "2", "--max-num-seqs", "2",
                    "--autoscaling-config", json.dumps(fast), env={"RAY_ADDRESS": cluster}, api_key=KEY) as server:
        assert "replicas: 1 to 2, autoscaled by Serve (target 2 ongoing requests each)" in server.output()
        d = _deployment()
        assert d.deployment_config.autoscaling_config["target_ongoing_requests"] == 2
        assert _running(d) == 1 and d.target_num_replicas == 1

        async def scale_up():
            stop = asyncio.Event()
            load = asyncio.create_task(_load(server.url, Path(tiny_model_dir).name, workers=8, budget=64, stop=stop))
            seen, start = None, time.monotonic()
            while not load.done() and time.monotonic() - start < 240:
                d = await asyncio.to_thread(_deployment)
                if _running(d) == 2:
                    seen = time.monotonic() - start
                    break
                await asyncio.sleep(0.5)
            stop.set()  # the requests under way finish; no new ones go out
            return seen, await asyncio.wait_for(load, timeout=300)

        seen, answers = asyncio.run(scale_up())
        print(f"second replica running {seen} s into the load; {len(answers)} requests")
        assert seen is not None, f"no second replica during {len(answers)} requests: {server.output()[-3000:]}"
        assert answers and all(r.status_code == 200 for r in answers), [r.status_code for r in answers]
        assert all(r.json()["usage"]["completion_tokens"] == 512 for r in answers)

        start = time.monotonic()
        _wait_for("back to one replica when idle",
                  lambda: (d := _deployment()).target_num_replicas == 1 and len(d.replicas) == 1, 120, server)
        print(f"back to one replica {time.monotonic() - start:.1f} s after the load")
        body = {"model": Path(tiny_model_dir).name, "prompt": "still there", "max_tokens": 4}
        r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=60)
        assert r.status_code == 200
    assert server.proc.returncode is not None and server.stop_seconds < 60, server.output()[-3000:]


def _graphs() -> dict[str, dict[str, str]]:
    """The actor graphs running, by graph id: each one's actors' names by role."""
    graphs: dict[str, dict[str, str]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == ACTOR_NAMESPACE:
            _, graph, role, _ = actor["name"].split("-")  # expertmesh-<graph>-<role><index>-<n>
            graphs.setdefault(graph, {})[role] = actor["name"]
    return graphs


def _tokens_routed(router_name: str) -> int:
    router = ray.get_actor(router_name, namespace=ACTOR_NAMESPACE)
    return sum(sum(counts) for counts in ray.get(router.load_counts.remote(), timeout=60).values())


@pytest.mark.slow
def test_two_replicas_in_actor_mode_each_run_a_graph_of_their_own(cluster, tiny_model_dir, tmp_path):
    """--replicas 2 with a deployment: two graphs, each with its own names, gRPC ports and placement groups;
    requests spread over both replicas all succeed, and each graph routed some of their tokens."""
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"attention_actors": 1, "expert_shards": 1, "transport": "grpc",
                                      "attention_resources": {"num_cpus": 0.5}, "router_resources": {"num_cpus": 0.5},
                                      "shard_resources": {"num_cpus": 0.5}}))
    with cli_server(tiny_model_dir, "--replicas", "2", "--deployment", str(deploy), env={"RAY_ADDRESS": cluster},
                    api_key=KEY) as server:
        assert "replicas: 2" in server.output()
        assert _running(_deployment()) == 2
        graphs = _graphs()
        assert len(graphs) == 2 and all(set(roles) == {"attention0", "router0", "shard0"} for roles in graphs.values())

        async def burst():
            async with httpx.AsyncClient(timeout=240) as client:
                body = {"model": Path(tiny_model_dir).name, "prompt": "two graphs", "max_tokens": 8,
                        "temperature": 0, "ignore_eos": True}
                return await asyncio.gather(*(client.post(server.url + "/v1/completions", json=body,
                                                          headers={"Authorization": f"Bearer {KEY}"})
                                              for _ in range(16)))

        answers = asyncio.run(burst())
        assert [r.status_code for r in answers] == [200] * 16
        assert len({r.json()["choices"][0]["text"] for r in answers}) == 1  # greedy: both graphs agree
        assert all(_tokens_routed(roles["router0"]) > 0 for roles in graphs.values())
        groups = [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
        assert len(groups) == 6  # a group per actor of each graph: none shared
    assert server.proc.returncode is not None and server.stop_seconds < 60, server.output()[-3000:]
