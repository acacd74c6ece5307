"""A new expert placement swapped in while a generation runs, on a real 3-node cluster, for every transport: a
hot expert replicated onto a second shard, then a shard drained out of the placement. The new replicas load
while steps go on, the swap happens between two steps, greedy tokens equal local mode's and no step fails."""

from __future__ import annotations

import pytest

from expertmesh import LLM, SamplingParams
from expertmesh.graph import ActorGraph
from tests.graph.fixtures import cluster_fixtures, generate_with, local_tokens, ray

pytestmark = pytest.mark.timeout(600)

PARAMS = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(7 + i, 7 + i + n))} for i, n in enumerate([4, 19, 8, 2, 11])]


cluster, free_cluster = cluster_fixtures(3)


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return local_tokens(tiny_model_dir, PROMPTS, PARAMS)


def pairs_served(executor, transport: str) -> list[int]:
    if transport == "inprocess":  # the shards live in the router: nothing to ask them separately
        return []
    return [info["pairs_served"] for info in ray.get([s.ping.remote() for s in executor.shards])]


@pytest.mark.parametrize("transport", ["grpc", "collective", "inprocess"])
def test_replicate_a_hot_expert_then_drain_a_shard_mid_generation(tiny_model_dir, local, transport):
    with LLM(str(tiny_model_dir), executor=ActorGraph({"expert_shards": 3, "transport": transport})) as llm:
        executor = llm.llm_engine.executor
        seen = {}

        def before_step(i: int) -> None:
            if i == 3:  # the busiest expert of layer 1 so far gets a replica on a shard that lacks it
                counts = executor.load_counts()[1]
                hot = max(range(len(counts)), key=counts.__getitem__)
                other = next(s for s in range(3) if s not in executor.placement.shards_for(1, hot))
                seen["hot"], seen["other"] = hot, other
                executor.set_placement(executor.placement.with_replica(1, hot, other))  # loaded, not yet used
                assert executor.placement.version == 0
            if i == 4:  # swapped in between steps 3 and 4
                assert executor.placement.version == 1
                assert executor.placement.shards_for(1, seen["hot"])[-1] == seen["other"]
            if i == 7:
                executor.set_placement(executor.placement.drained(2))
            if i == 8:
                seen["drained_at"] = pairs_served(executor, transport)

        assert generate_with(llm, PROMPTS, PARAMS, before_step) == local
        assert executor.recoveries == []  # no step failed
        assert [h["outcome"] for h in executor.swap.history] == ["swapped", "swapped"]
        assert executor.placement.version == 2 and executor.placement.shard_experts(2) == []
        assert executor.placement.shards_for(1, seen["hot"]) != ()
        after = pairs_served(executor, transport)
        if transport != "inprocess":
            assert ray.get(executor.shards[2].ping.remote())["num_experts"] == 0
            assert after[2] == seen["drained_at"][2]  # the drained shard got no work after the swap
            assert after[0] > seen["drained_at"][0] and after[1] > seen["drained_at"][1]


def test_a_placement_that_does_not_fit_the_graph_is_refused(tiny_model_dir):
    with LLM(str(tiny_model_dir), executor=ActorGraph({"expert_shards": 2, "transport": "grpc"})) as llm:
        executor = llm.llm_engine.executor
        from expertmesh.experts import PlacementTable

        wider = PlacementTable.balanced(executor.placement.moe_layers, executor.placement.num_experts, 3)
        with pytest.raises(ValueError, match=r"the placement has 3 shards; this deployment runs at most 2 \(expert_shards"):
            executor.set_placement(wider)
        other_model = PlacementTable.balanced([0, 1], 4, 2)
        with pytest.raises(ValueError, match=r"MoE layers \[0, 1\] x 4 experts; this model has \[1, 2, 3\] x 16"):
            executor.set_placement(other_model)
        executor.set_placement(executor.placement.with_replica(1, 0, 1), wait=False)
        with pytest.raises(ValueError, match="a swap to placement version 1 is pending"):
            executor.set_placement(executor.placement.with_replica(1, 1, 0))
        assert executor.placement.version == 0
