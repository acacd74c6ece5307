"""The local deployment file shipped in examples/ is one the graph accepts, fits a laptop, and the README
points to it."""

from pathlib import Path

from expertmesh.graph.deployment import DeploymentConfig
from expertmesh.model import ModelConfig
from expertmesh.testing import preset_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "examples/deployment-local.yaml"


def test_local_deployment_example_loads_and_places_the_tiny_model():
    d = DeploymentConfig.load(ROOT / EXAMPLE)
    assert (d.attention_actors, d.expert_shards, d.transport, d.ray_address) == (1, 2, "grpc", None)
    assert d.total_gpus == 0 and d.total_cpus <= 4

    table = d.placement_for(ModelConfig.from_dict(preset_config("tiny")))
    assert all(table.shard_experts(s) for s in range(2))


def test_readme_shows_how_to_serve_with_it():
    readme = (ROOT / "README.md").read_text()
    assert f"--deployment {EXAMPLE}" in readme
