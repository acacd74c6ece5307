"""`python -m expertmesh serve --deployment ... --lora-modules ...`: LoRA adapters served by an actor graph whose
expert shards scale, on a two-node local cluster, driven by the official `openai` client. Streams of two adapters (one made by peft, one by
our writer) and of the base model run together; an expert shard is killed while they are open, and later the
graph scales from 2 to 3 expert shards and back by `POST /v1/experts/scale` while they are open. Every stream
completes with the offline engine's text for its adapter (`LLM(enable_lora=True)` in local mode, itself
checked against transformers + peft)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import ray
import yaml

from expertmesh import LLM, LoRARequest, SamplingParams
from expertmesh.graph.runtime import ACTOR_NAMESPACE
from tests.graph.fixtures import start_cluster, stop_cluster
from tests.lora_adapters import make_peft_adapter, write_adapter
from tests.server.cli_server import cli_server
from tests.server.streaming import stream_text

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

KEY = "graph-lora-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 40
LONG = 160  # tokens of the streams a scaling runs beside: seconds of decoding, longer than starting a shard
PROMPTS = [f"stream {i}: experts hold their adapters" + " and shards" * i for i in range(6)]
MODELS = ["peft", "ours", None, "peft", "ours", None]  # None: the base model


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graph-serve-lora")
    return {"peft": make_peft_adapter(Path(tiny_model_dir), "deepseek_v3", root / "peft", rank=8, seed=1),
            "ours": write_adapter(tiny_model_dir, root / "ours", rank=4)}


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters) -> dict[int, list[str]]:
    """The offline texts per stream, for MAX_TOKENS and for LONG tokens."""
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    texts = {}
    with LLM(tiny_model_dir, enable_lora=True, max_loras=2) as llm:
        for n in (MAX_TOKENS, LONG):
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            outs = llm.generate(PROMPTS, params, lora_request=[requests.get(m) for m in MODELS])
            texts[n] = [o.outputs[0].text for o in outs]
    assert texts[MAX_TOKENS][0] != texts[MAX_TOKENS][2] and texts[MAX_TOKENS][1] != texts[MAX_TOKENS][2]
    return texts


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters, expected, tmp_path_factory):
    cluster = start_cluster(2, cpus_per_node=4)  # two nodes: the graph spans them, and a third shard fits
    try:
        deploy = tmp_path_factory.mktemp("deploy") / "deploy.yaml"
        deploy.write_text(yaml.safe_dump({"attention_actors": 1, "expert_shards": {"min": 2, "max": 3},
                                          "transport": "grpc", "placement_strategy": "SPREAD"}))
        with cli_server(tiny_model_dir, "--deployment", str(deploy), "--lora-modules", f"peft={adapters['peft']}",
                        f"ours={adapters['ours']}", "--max-loras", "2",
                        env={"RAY_ADDRESS": cluster.address}, api_key=KEY) as srv:
            yield srv
        assert srv.proc.returncode is not None and srv.stop_seconds < 60, srv.output()[-3000:]
    finally:
        stop_cluster(cluster)


def _shards() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == ACTOR_NAMESPACE and "-shard" in a["name"])


def _streams_with(server, model_dir, act, max_tokens: int = MAX_TOKENS) -> tuple[list[str], object]:
    """Opens one stream per prompt (its adapter by MODELS), runs `act(http)` once all have started, and returns
    (the streams' texts, what `act` returned)."""
    base = Path(model_dir).name
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    started = [asyncio.Event() for _ in PROMPTS]

    async def run():
        try:
            streams = [asyncio.create_task(stream_text(client, m or base, p, e, max_tokens))
                       for m, p, e in zip(MODELS, PROMPTS, started)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=120)
            async with httpx.AsyncClient(timeout=120) as http:
                acted = await act(http)
            return await asyncio.wait_for(asyncio.gather(*streams), timeout=300), acted
        finally:
            await client.close()

    return asyncio.run(run())


def test_a_shard_killed_while_adapter_streams_are_open(server, tiny_model_dir, expected):
    async def kill(http):
        victim = _shards()[0]
        await asyncio.to_thread(lambda: ray.kill(ray.get_actor(victim, namespace=ACTOR_NAMESPACE), no_restart=True))
        return victim

    texts, victim = _streams_with(server, tiny_model_dir, kill)
    assert texts == expected[MAX_TOKENS]
    body = httpx.get(server.url + "/v1/experts", headers=AUTH, timeout=60).json()
    assert body["recoveries"], "the graph did not notice the dead shard"
    deadline = time.monotonic() + 60
    while victim in _shards() and time.monotonic() < deadline:  # Ray releases the dead actor's name
        time.sleep(0.5)
    assert victim not in _shards() and len(_shards()) == 2


def test_scaling_up_and_down_while_adapter_streams_are_open(server, tiny_model_dir, expected):
    def scale(to: int):
        async def act(http):
            return await http.post(server.url + "/v1/experts/scale", json={"expert_shards": to}, headers=AUTH)
        return act

    for to in (3, 2):
        texts, response = _streams_with(server, tiny_model_dir, scale(to), LONG)
        assert response.status_code == 200, response.text
        assert response.json()["to"] == to
        assert texts == expected[LONG]
        # the swap commits at a step boundary once its replicas are loaded: usually while the streams run, but
        # on a loaded machine the new shard may still be starting when they end, so steps are driven until then
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            body = httpx.get(server.url + "/v1/experts", headers=AUTH, timeout=60).json()
            if body["elastic"]["pending_version"] is None:
                break
            httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "peft", "prompt": "one more step", "max_tokens": 2})
        assert body["placement"]["num_shards"] == to, (body["elastic"]["swaps"], body["elastic"]["scalings"])
        assert body["elastic"]["swaps"][-1]["outcome"] == "swapped"
    deadline = time.monotonic() + 60
    while len(_shards()) != 2 and time.monotonic() < deadline:  # the retired shard's actor ends
        time.sleep(0.5)
    assert len(_shards()) == 2
    assert _streams_with(server, tiny_model_dir, lambda http: asyncio.sleep(0))[0] == expected[MAX_TOKENS]
