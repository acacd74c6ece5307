"""Expert shards that scale while a generation runs, on a local cluster that has no room for another shard:
scaling up starts a shard that waits to be placed until a node joins (`Cluster.add_node`, what the Ray
autoscaler does on a real cluster), then swaps in a placement over three shards; scaling down swaps in one
over two and ends the third. No step fails and greedy tokens equal local mode's."""

from __future__ import annotations

import threading
import time

import pytest

from expertmesh import LLM, SamplingParams
from expertmesh.graph import ActorGraph
from expertmesh.platform.elastic import ElasticExperts, RebalanceBusy
from tests.graph.fixtures import generate_with, local_tokens, ray, start_cluster, stop_cluster

pytestmark = pytest.mark.timeout(600)

PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(7 + i, 7 + i + n))} for i, n in enumerate([4, 19, 8, 2, 11])]


@pytest.fixture
def full_cluster():
    cluster = start_cluster(2)  # 4 CPUs: the attention actor, the router and two shards take them all
    yield cluster
    stop_cluster(cluster)


def test_scaling_up_onto_a_node_that_joins_then_down(tiny_model_dir, full_cluster):
    local = local_tokens(tiny_model_dir, PROMPTS, PARAMS)
    deployment = {"expert_shards": {"min": 2, "max": 3}, "transport": "grpc", "shard_resources": {"num_cpus": 1},
                  "attention_resources": {"num_cpus": 1}, "router_resources": {"num_cpus": 1}}
    with LLM(str(tiny_model_dir), executor=ActorGraph(deployment)) as llm:
        executor = llm.llm_engine.executor
        elastic = ElasticExperts(executor)
        up: dict = {}
        seen: dict = {}

        def scale_up() -> None:
            try:
                up["change"] = elastic.scale(3)
            except Exception as e:  # noqa: BLE001 - the test reports it
                up["error"] = e

        thread = threading.Thread(target=scale_up)

        def before_step(i: int) -> None:
            if i == 2:
                thread.start()
            if i == 4:
                time.sleep(1.0)  # the new shard is waiting to be placed: no node has a CPU left
                assert thread.is_alive() and executor.placement.num_shards == 2
                seen["nodes_before"] = len(ray.nodes())
                full_cluster.add_node(num_cpus=1)
            if 4 < i < 30 and thread.is_alive():
                time.sleep(0.2)  # steps go on, slowly, while the shard starts
            if i == 30:
                thread.join(timeout=120)
                assert "error" not in up, up
            if i > 30 and "down" not in seen and executor.placement.num_shards == 3:
                with pytest.raises(ValueError, match=r"expert_shards must be an integer in \[2, 3\]"):
                    elastic.scale(4)
                seen["down"] = elastic.scale(2)
                with pytest.raises(RebalanceBusy):
                    elastic.scale(3)

        assert generate_with(llm, PROMPTS, PARAMS, before_step) == local
        assert executor.recoveries == []
        assert up["change"]["from"] == 2 and up["change"]["to"] == 3 and up["change"]["version"] == 1
        assert seen["down"]["version"] == 2
        swaps = executor.placement_swaps()
        assert [s["outcome"] for s in swaps] == ["swapped", "swapped"]
        assert [s["num_shards"] for s in swaps] == [3, 2] and swaps[1]["retired"] == 1
        assert executor.placement.num_shards == 2 and len(executor.shard_members) == 2
        held = [info["num_experts"] for info in ray.get([s.ping.remote() for s in executor.shards])]
        assert sum(held) >= 16 * len(executor.placement.moe_layers)
