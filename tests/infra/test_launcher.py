"""infra/ray/cluster-aws-gpu.yaml is a config `ray up` accepts: it passes Ray's own schema and checks, as
written and after Ray fills in its AWS defaults (no AWS call is made), and its GPU worker types scale from
zero and carry the custom resources that pin the actor graph's roles to them."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "infra" / "ray" / "cluster-aws-gpu.yaml"
DEPLOYMENT = ROOT / "infra" / "serve" / "deployment-gpu.yaml"
GPU_TYPES = {"gpu-attention": "expertmesh_attention", "gpu-experts": "expertmesh_experts"}


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_config_passes_rays_validation(config):
    validate_config(copy.deepcopy(config))


def test_config_passes_after_ray_fills_its_aws_defaults(config):
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before it validates
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert set(GPU_TYPES) <= set(prepared["available_node_types"])


def test_gpu_worker_types_scale_from_zero_with_their_custom_resource(config):
    types = config["available_node_types"]
    for name, resource in GPU_TYPES.items():
        node_type = types[name]
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] > 0, name
        assert node_type["resources"][resource] == 1, name
        assert node_type["resources"]["GPU"] > 0, name
        assert "--gpus all" in node_type["docker"]["worker_run_options"], name
        others = set(GPU_TYPES.values()) - {resource}
        assert not others & set(node_type["resources"]), f"{name} advertises another role's resource"


@pytest.mark.skipif(not DEPLOYMENT.exists(), reason="infra/serve/deployment-gpu.yaml is not there")
def test_every_resource_the_gpu_deployment_asks_for_is_advertised(config):
    from expertmesh.graph.deployment import DeploymentConfig

    deployment = DeploymentConfig.from_yaml(DEPLOYMENT)
    advertised = {}
    for node_type in config["available_node_types"].values():
        for name, amount in node_type["resources"].items():
            advertised[name] = max(advertised.get(name, 0), amount)
    for role in ("attention_resources", "router_resources", "shard_resources"):
        for name, amount in getattr(deployment, role).resources.items():
            assert advertised.get(name, 0) >= amount, f"{role} asks for {name}, which no node type advertises"
    assert deployment.cluster_autoscales  # the GPU types start at zero nodes


def test_head_schedules_no_work_and_keeps_the_dashboard_local(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "GPU" not in head["resources"]
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "--metrics-export-port=8080" in start
    assert "--metrics-export-port=8080" in " ".join(config["worker_start_ray_commands"])


def test_every_node_runs_the_project_image(config):
    assert config["docker"]["image"] == "expertmesh:0.1.0"
    for name, node_type in config["available_node_types"].items():
        assert "worker_image" not in node_type.get("docker", {}), name


def _broken(config: dict, how: str) -> dict:
    cfg = copy.deepcopy(config)
    if how == "no provider":
        del cfg["provider"]
    elif how == "negative resource":
        cfg["available_node_types"]["gpu-experts"]["resources"]["expertmesh_experts"] = -1
    elif how == "unknown field":
        cfg["available_node_types"]["gpu-attention"]["min_worker"] = 0
    elif how == "head type missing":
        cfg["head_node_type"] = "gpu-head"
    elif how == "min_workers over max_workers":
        cfg["available_node_types"]["gpu-experts"]["min_workers"] = cfg["max_workers"] + 1
    return cfg


@pytest.mark.parametrize("how", ["no provider", "negative resource", "unknown field", "head type missing",
                                 "min_workers over max_workers"])
def test_a_broken_copy_fails_validation(config, how):
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(_broken(config, how))
