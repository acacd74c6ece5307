"""Deployment configs: defaults, YAML, the placement they give a model, and refusals that name the field."""

import pytest

from expertmesh.model import ModelConfig
from expertmesh.graph.deployment import DeploymentConfig

from tests.model.test_config import DEEPSEEK_V3_PUBLISHED  # 6 layers; MoE at 2 and 4; 8 routed experts

MODEL = ModelConfig.from_dict(DEEPSEEK_V3_PUBLISHED)


def test_defaults_are_a_single_local_replica():
    d = DeploymentConfig.from_dict({})
    assert (d.attention_actors, d.expert_shards, d.transport, d.ray_address) == (1, 1, "inprocess", None)
    assert d.placement_for(MODEL).shard_experts(0) == [(layer, e) for layer in (2, 4) for e in range(8)]


def test_yaml_with_explicit_placement_and_resources(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(
        "attention_actors: 2\n"
        "expert_shards: 2\n"
        "transport: grpc\n"
        "shard_resources: {num_cpus: 0.5, num_gpus: 1}\n"
        "expert_placement:\n"
        "  0: [[2, 0], [2, 1], [2, 2], [2, 3], [4, 0], [4, 1], [4, 2], [4, 3]]\n"
        "  1: [[2, 4], [2, 5], [2, 6], [2, 7], [4, 4], [4, 5], [4, 6], [4, 7], [2, 0]]\n"
    )
    d = DeploymentConfig.from_yaml(path)
    table = d.placement_for(MODEL)
    assert table.shards_for(2, 0) == (0, 1) and table.shards_for(4, 7) == (1,)
    assert d.total_gpus == 2 and d.total_cpus == 2 * 1 + 1 + 2 * 0.5
    inprocess = DeploymentConfig.from_dict({"expert_shards": 3, "transport": "inprocess", "shard_resources": {"num_cpus": 4}})
    assert inprocess.shard_actors == 0 and inprocess.total_cpus == 2  # its shards live in the router
    d.check_cluster({"CPU": 4.0, "GPU": 2.0})
    with pytest.raises(ValueError, match="needs 2 GPUs but the cluster has 1"):
        d.check_cluster({"CPU": 8.0, "GPU": 1.0})


@pytest.mark.parametrize("raw,needle", [
    ({"micro_batches": 3}, "micro_batches must be 1, 2 or 'auto', got 3"),
    ({"transport": "carrier-pigeon"}, "transport must be one of inprocess, grpc, collective"),
    ({"expert_shards": 0}, "expert_shards"),
    ({"attention_actors": 1.5}, "attention_actors"),
    ({"placement_strategy": "RANDOM"}, "placement_strategy"),
    ({"expert_shard": 2}, r"unknown deployment fields \['expert_shard'\]"),
    ({"shard_resources": {"num_gpu": 1}}, "shard_resources"),
    ({"shard_resources": {"num_gpus": -1}}, "num_gpus"),
    ({"expert_placement": "random"}, "expert_placement"),
    ({"expert_shards": 2, "expert_placement": {5: [[2, 0]]}}, r"shards \[5\] outside"),
    ({"expert_placement": {0: "all"}}, r"expert_placement\[0\]"),
    ({"shard_resources": {"resources": {"GPU": 1}}}, "shard_resources: resources names custom Ray resources"),
    ({"shard_resources": {"resources": {"expertmesh_experts": 0}}}, r"resources\['expertmesh_experts'\]"),
    ({"shard_resources": {"resources": ["expertmesh_experts"]}}, "resources must be a mapping"),
    ({"cluster_autoscales": "yes"}, "cluster_autoscales must be true or false"),
    ({"placement_timeout_s": 0}, "placement_timeout_s"),
])
def test_configs_that_cannot_work_are_refused_naming_the_field(raw, needle):
    with pytest.raises(ValueError, match=needle):
        DeploymentConfig.from_dict(raw)


def test_custom_resources_pin_each_role_to_its_worker_group():
    d = DeploymentConfig.from_dict({
        "attention_actors": 2, "expert_shards": 4, "transport": "grpc",
        "attention_resources": {"num_cpus": 8, "num_gpus": 1, "resources": {"expertmesh_attention": 1}},
        "router_resources": {"num_cpus": 2, "resources": {"expertmesh_attention": 0.01}},
        "shard_resources": {"num_cpus": 8, "num_gpus": 1, "resources": {"expertmesh_experts": 1}},
    })
    assert d.attention_resources.bundle() == {"CPU": 8, "GPU": 1, "expertmesh_attention": 1}
    assert d.total_resources() == {"CPU": 2 * 8 + 2 + 4 * 8, "GPU": 6, "expertmesh_attention": 2.01,
                                   "expertmesh_experts": 4}
    d.check_cluster({"CPU": 64.0, "GPU": 8.0, "expertmesh_attention": 4.0, "expertmesh_experts": 4.0})
    with pytest.raises(ValueError, match="needs 4 of resource expertmesh_experts but the cluster has 2"):
        d.check_cluster({"CPU": 64.0, "GPU": 8.0, "expertmesh_attention": 4.0, "expertmesh_experts": 2.0})


def test_placement_that_misses_experts_or_leaves_a_shard_empty_is_refused():
    missing = DeploymentConfig.from_dict({"expert_placement": {0: [[2, e] for e in range(8)]}})
    with pytest.raises(ValueError, match=r"8 experts are held by no shard: \(4, 0\)"):
        missing.placement_for(MODEL)
    idle = DeploymentConfig.from_dict({"expert_shards": 2, "expert_placement": {
        0: [[layer, e] for layer in (2, 4) for e in range(8)]}})
    with pytest.raises(ValueError, match=r"shards \[1\] with no experts"):
        idle.placement_for(MODEL)


def test_bad_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("attention_actors: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        DeploymentConfig.from_yaml(path)
