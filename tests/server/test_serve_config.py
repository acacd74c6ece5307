"""The Serve config `expertmesh serve --print-serve-config` writes for `serve deploy`/`serve run` on an
existing cluster: valid for Ray Serve's own schema, and its import path builds our application."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
import yaml
from ray.serve.schema import ServeDeploySchema

from expertmesh.cli import main
from expertmesh.platform.server.serve_app import DEPLOYMENT_NAME


def _config(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "expertmesh", "serve", *args, "--print-serve-config"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return yaml.safe_load(out)


def test_printed_config_validates_and_builds_the_app(tiny_model_dir, tmp_path):
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("attention_actors: 1\nexpert_shards: 2\ntransport: grpc\n")
    config = _config("--model", str(tiny_model_dir), "--deployment", str(deploy), "--port", "8100",
                     "--max-num-seqs", "8")
    ServeDeploySchema.model_validate(config)  # Ray Serve's own check of a config file
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8100}
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    application = builder(app["args"])
    deployment = application._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME
    settings = deployment.init_args[0]
    assert settings["model"] == str(tiny_model_dir.resolve())
    # inlined: the cluster that reads the config has no copy of the file
    assert settings["deployment"] == {"attention_actors": 1, "expert_shards": 2, "transport": "grpc"}
    assert settings["engine_kwargs"] == {"max_num_seqs": 8}
    assert "api_keys" not in app["args"]  # keys never go into a file meant for sharing


def test_app_builder_refuses_unknown_settings(tiny_model_dir):
    from expertmesh.platform.server.serve_app import app_builder

    with pytest.raises(ValueError, match="unknown settings.*'modle'"):
        app_builder({"modle": str(tiny_model_dir)})
    with pytest.raises(ValueError, match="model=DIR"):
        app_builder({})


def test_serve_refuses_a_missing_model_and_a_bad_port(tmp_path, tiny_model_dir, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err


def test_device_flag(tmp_path, tiny_model_dir, capsys):
    """--device is local mode's; a GPU engine's replica asks Ray for a GPU (Ray hides GPUs from actors that
    ask for none); without CUDA, --device cuda is refused before anything starts."""
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("attention_actors: 1\n")
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cuda", "--deployment", str(deploy)]) == 2
    assert "--device is for local mode" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["serve", "--model", str(tiny_model_dir), "--device", "cuda"]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err
    config = _config("--model", str(tiny_model_dir), "--device", "cuda")
    (app,) = config["applications"]
    assert app["args"]["engine_kwargs"] == {"device": "cuda"}
    from expertmesh.platform.server.serve_app import app_builder

    options = app_builder(app["args"])._bound_deployment.ray_actor_options
    assert options["num_gpus"] == 1
    cpu_options = app_builder({"model": str(tiny_model_dir)})._bound_deployment.ray_actor_options
    assert cpu_options["num_gpus"] == 0

