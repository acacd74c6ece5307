"""`expertmesh serve --deployment` on an actor graph, joining a Ray cluster through RAY_ADDRESS: an expert
shard killed while 8 streams are open is replaced, and the experts rebalanced (hot ones replicated into the
shards' spare slots) while 8 streams are open; every stream completes with the offline tokens."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import ray
import yaml

from expertmesh import LLM, SamplingParams
from expertmesh.graph.runtime import ACTOR_NAMESPACE
from tests.server.cli_server import cli_server
from tests.server.streaming import stream_text

pytestmark = pytest.mark.slow

KEY = "graph-test-key"
MAX_TOKENS = 40
PROMPTS = [f"stream {i}: the router sends tokens to experts" + " and shards" * i for i in range(8)]


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def server(cluster, tiny_model_dir, tmp_path_factory):
    deploy = tmp_path_factory.mktemp("deploy") / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"attention_actors": 1, "expert_shards": 2, "transport": "grpc",
                                      "placement_strategy": "PACK", "expert_slots_per_shard": 10}))
    with cli_server(tiny_model_dir, "--deployment", str(deploy), env={"RAY_ADDRESS": cluster}, api_key=KEY) as srv:
        yield srv
    assert srv.proc.returncode is not None and srv.stop_seconds < 60, srv.output()[-3000:]


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    with LLM(tiny_model_dir) as llm:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        return [out.outputs[0].text for out in llm.generate(PROMPTS, params)]


def _shards() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == ACTOR_NAMESPACE and "-shard" in a["name"])


def test_experts_endpoint_shows_the_graph_placement(server):
    body = httpx.get(server.url + "/v1/experts", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    assert body["mode"] == "actor graph (grpc)" and body["placement"]["version"] == 0
    assert body["placement"]["num_shards"] == 2
    shards = {s for replicas in body["placement"]["replicas"].values() for s in replicas}
    assert shards == {0, 1}
    assert len(_shards()) == 2


def test_killing_a_shard_with_8_open_streams(server, tiny_model_dir, expected):
    model = Path(tiny_model_dir).name
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    started = [asyncio.Event() for _ in PROMPTS]

    async def one(i: int) -> str:
        return await stream_text(client, model, PROMPTS[i], started[i], MAX_TOKENS)

    async def kill_when_streaming():
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=120)
        victim = _shards()[0]
        await asyncio.to_thread(lambda: ray.kill(ray.get_actor(victim, namespace=ACTOR_NAMESPACE), no_restart=True))
        return victim

    async def run():
        try:
            streams = [asyncio.create_task(one(i)) for i in range(len(PROMPTS))]
            victim = await kill_when_streaming()
            texts = await asyncio.wait_for(asyncio.gather(*streams), timeout=300)
            return victim, texts
        finally:
            await client.close()

    victim, texts = asyncio.run(run())
    assert texts == expected
    body = httpx.get(server.url + "/v1/experts", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    assert body["recoveries"], "the graph did not notice the dead shard"
    deadline = time.monotonic() + 60
    while victim in _shards() and time.monotonic() < deadline:  # Ray releases the dead actor's name
        time.sleep(0.5)
    assert victim not in _shards() and len(_shards()) == 2  # replaced under a new name
    assert httpx.get(server.url + "/health", timeout=60).status_code == 200


def test_rebalancing_the_experts_with_8_open_streams(server, tiny_model_dir, expected):
    model = Path(tiny_model_dir).name
    auth = {"Authorization": f"Bearer {KEY}"}
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    started = [asyncio.Event() for _ in PROMPTS]
    before = httpx.get(server.url + "/v1/experts", headers=auth, timeout=60).json()["placement"]["version"]

    async def one(i: int) -> str:
        return await stream_text(client, model, PROMPTS[i], started[i], MAX_TOKENS)

    async def run():
        try:
            streams = [asyncio.create_task(one(i)) for i in range(len(PROMPTS))]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=120)
            async with httpx.AsyncClient(timeout=60) as http:
                refused = await http.post(server.url + "/v1/experts/rebalance", json={"force": "yes"}, headers=auth)
                unauthorised = await http.post(server.url + "/v1/experts/rebalance", json={})
                done = await http.post(server.url + "/v1/experts/rebalance", json={"force": True}, headers=auth)
            texts = await asyncio.wait_for(asyncio.gather(*streams), timeout=300)
            return refused, unauthorised, done, texts
        finally:
            await client.close()

    refused, unauthorised, done, texts = asyncio.run(run())
    assert texts == expected
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "force"
    assert unauthorised.status_code == 401
    assert done.status_code == 200, done.text
    decision = done.json()
    assert decision["version"] == before + 1 and decision["after"] <= decision["before"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # swapped at the first step boundary after its replicas loaded
        body = httpx.get(server.url + "/v1/experts", headers=auth, timeout=60).json()
        if body["placement"]["version"] == before + 1:
            break
        httpx.post(server.url + "/v1/completions", headers=auth, timeout=60,
                   json={"model": model, "prompt": "one more step", "max_tokens": 2})
    assert body["placement"]["version"] == before + 1 and body["placement"]["slots"] == [10, 10]
    assert body["elastic"]["decisions"][-1]["version"] == before + 1
    assert body["elastic"]["swaps"][-1]["outcome"] == "swapped"
    replicas = body["placement"]["replicas"]
    assert sum(len(s) for s in replicas.values()) == 20 * len(body["placement"]["moe_layers"])
    fixed = httpx.post(server.url + "/v1/experts/scale", json={"expert_shards": 3}, headers=auth, timeout=60)
    assert fixed.status_code == 400 and "in [2, 2]" in fixed.json()["error"]["message"]  # no min/max: fixed
    metrics = httpx.get(server.url + "/metrics", headers=auth, timeout=60).text
    assert f"expertmesh_placement_version {float(before + 1)}" in metrics
