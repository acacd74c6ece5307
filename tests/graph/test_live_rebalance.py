"""The live rebalancer on a real two-node cluster: mid-generation it reads the router's load window, asks the
rebalancer for a placement with redundant replicas of the hot experts (spare slots on each shard), and
starts the swap without waiting; the replicas load while steps go on, the swap happens between two steps,
no step fails and greedy tokens equal local mode's. A second rebalance while the swap is under way is
refused, not queued."""

from __future__ import annotations

import pytest

from expertmesh import SamplingParams
from expertmesh.graph import ActorGraph
from expertmesh.platform.elastic import ElasticExperts, RebalanceBusy
from tests.graph.fixtures import cluster_fixtures, generate_with, local_tokens, ray

pytestmark = pytest.mark.timeout(600)

PARAMS = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(7 + i, 7 + i + n))} for i, n in enumerate([4, 19, 8, 2, 11, 6])]

cluster, free_cluster = cluster_fixtures(2)


def test_a_rebalance_mid_generation_keeps_every_token(tiny_model_dir):
    from expertmesh import LLM

    local = local_tokens(tiny_model_dir, PROMPTS, PARAMS)
    deployment = {"expert_shards": 2, "transport": "grpc", "expert_slots_per_shard": 10}  # 16 experts: 4 spare
    with LLM(str(tiny_model_dir), executor=ActorGraph(deployment)) as llm:
        executor = llm.llm_engine.executor
        rebalancer = ElasticExperts(executor)
        seen = {}

        def before_step(i: int) -> None:
            if i == 3:
                seen["decision"] = rebalancer.rebalance(force=True)
                assert seen["decision"]["version"] == 1 and executor.placement.version == 0  # loading, not in use
                with pytest.raises(RebalanceBusy, match="placement version 1 is under way"):
                    rebalancer.rebalance(force=True)
            if i == 6:
                seen["version_at_6"] = executor.placement.version

        assert generate_with(llm, PROMPTS, PARAMS, before_step) == local
        assert executor.recoveries == []
        assert seen["version_at_6"] == 1 and [s["outcome"] for s in executor.placement_swaps()] == ["swapped"]
        table = executor.placement
        assert table.slots == (10, 10)
        for layer in table.moe_layers:  # every slot of every shard holds a replica; hot experts have two
            assert all(sum(s in table.shards_for(layer, e) for e in range(16)) == 10 for s in range(2))
            assert sum(len(table.shards_for(layer, e)) for e in range(16)) == 20
        decision = seen["decision"]
        assert decision["after"] <= decision["before"] and decision["replicas_loaded"] > 0
        held = [info["num_experts"] for info in ray.get([s.ping.remote() for s in executor.shards])]
        assert held == [10 * len(table.moe_layers)] * 2  # the shards hold exactly the new placement
        status = rebalancer.status()
        assert status["pending_version"] is None and status["decisions"][-1]["version"] == 1
