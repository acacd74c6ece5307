"""Custom Ray resources pin each role of the graph to its worker group, as the KubeRay RayService's groups
(`gpu-attention`, `gpu-experts`) and infra/serve/deployment-gpu.yaml do; a graph bigger than the cluster is
refused up front, unless the cluster autoscales, where it waits `placement_timeout_s` for the nodes."""

from __future__ import annotations

import pytest

from expertmesh import LLM
from expertmesh.graph import ActorGraph
from tests.graph.fixtures import GREEDY, local_tokens, node_of, ray, token_ids

ATTENTION = {"expertmesh_attention": 1, "expertmesh_router": 1}
EXPERTS = {"expertmesh_experts": 2}


@pytest.fixture(scope="module")
def groups():
    """A head with no custom resources and one node per worker group; yields {group: node id}."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        attention = cluster.add_node(num_cpus=2, resources=ATTENTION)
        experts = cluster.add_node(num_cpus=2, resources=EXPERTS)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield {"attention": attention.node_id, "experts": experts.node_id}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def _deployment(**extra) -> dict:
    return {
        "attention_actors": 1, "expert_shards": 2, "transport": "grpc", "placement_strategy": "PACK",
        "attention_resources": {"num_cpus": 1, "resources": {"expertmesh_attention": 1}},
        "router_resources": {"num_cpus": 0.5, "resources": {"expertmesh_router": 1}},
        "shard_resources": {"num_cpus": 0.5, "resources": {"expertmesh_experts": 1}},
        **extra,
    }


def test_each_role_lands_on_its_group(groups, tiny_model_dir):
    prompts = [{"prompt_token_ids": [5, 9, 13, 2]}, {"prompt_token_ids": [7, 7, 8]}]
    want = local_tokens(tiny_model_dir, prompts)
    with LLM(str(tiny_model_dir), executor=ActorGraph(_deployment())) as llm:
        executor = llm.llm_engine.executor
        assert token_ids(llm.generate(prompts, GREEDY)) == want
        assert node_of(executor.attention[0]) == groups["attention"]
        assert node_of(executor.router) == groups["attention"]
        assert {node_of(s) for s in executor.shards} == {groups["experts"]}


def test_a_graph_the_cluster_cannot_hold(groups, tiny_model_dir):
    three_shards = _deployment(expert_shards=3)  # the experts group advertises room for two
    with pytest.raises(ValueError, match="needs 3 of resource expertmesh_experts but the cluster has 2"):
        LLM(str(tiny_model_dir), executor=ActorGraph(three_shards))
    # an autoscaling cluster would add a node; this one never does, so the wait ends with a clear error
    waiting = _deployment(expert_shards=3, cluster_autoscales=True, placement_timeout_s=3)
    # Ray places pending groups in no fixed order, so any one of the three may be the one left waiting
    with pytest.raises(TimeoutError, match=r"could not start: expert shard (\d) not placed within 3 s "
                                           r"\(expert shard \1 needs \{'CPU': 0.5, 'expertmesh_experts': 1\};"):
        LLM(str(tiny_model_dir), executor=ActorGraph(waiting))
