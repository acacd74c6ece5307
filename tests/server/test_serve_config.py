"""The Serve config `expertmesh serve --print-serve-config` writes for `serve deploy`/`serve run` on an
existing cluster: valid for Ray Serve's own schema, and its import path builds our application."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
from pathlib import Path

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


def test_printed_config_validates_and_builds_the_app(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTMESH_API_KEY", "key-from-a-secret")  # as the KubeRay manifests give it
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("attention_actors: 1\nexpert_shards: 2\ntransport: grpc\n")
    config = _config("--model", str(tiny_model_dir), "--deployment", str(deploy), "--port", "8100",
                     "--max-num-seqs", "8", "--num-threads", "1")
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
    assert settings["num_threads"] == 1  # the replica's torch threads (serve_app sets them)
    assert "api_keys" not in app["args"]  # keys never go into a file meant for sharing
    assert settings["api_keys"] == ("key-from-a-secret",) and not settings["allow_no_api_key"]


def test_serve_entry_points_fail_closed_without_a_key(tiny_model_dir, monkeypatch):
    from expertmesh.platform.server.serve_app import app_builder

    monkeypatch.delenv("EXPERTMESH_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no API key is configured.*allow_no_api_key: true"):
        app_builder({"model": str(tiny_model_dir)})
    for flag in (True, "true", "True"):  # a config file gives a bool, `serve run ... k=v` a string
        settings = app_builder({"model": str(tiny_model_dir), "allow_no_api_key": flag})._bound_deployment.init_args[0]
        assert settings["api_keys"] == () and settings["allow_no_api_key"] is True
    with pytest.raises(ValueError, match="allow_no_api_key must be true or false"):
        app_builder({"model": str(tiny_model_dir), "allow_no_api_key": "yes please"})
    # the deployment itself refuses too, however it was bound (e.g. serve.run(build_application(...)))
    from expertmesh.platform.server.serve_app import ExpertmeshServer

    replica = object.__new__(ExpertmeshServer)
    with pytest.raises(ValueError, match="no API key is configured"):  # Serve's ingress makes __init__ async
        asyncio.run(ExpertmeshServer.__init__(replica, {"model": str(tiny_model_dir)}))


@pytest.mark.parametrize(("given", "keys"), [("sekrit", ("sekrit",)), (["k1", "k2"], ("k1", "k2")),
                                             (("k1",), ("k1",))])
def test_api_keys_are_one_string_or_a_list(tiny_model_dir, monkeypatch, given, keys):
    from expertmesh.platform.server.serve_app import app_builder

    monkeypatch.delenv("EXPERTMESH_API_KEY", raising=False)
    settings = app_builder({"model": str(tiny_model_dir), "api_keys": given})._bound_deployment.init_args[0]
    assert settings["api_keys"] == keys  # never ('s', 'e', 'k', ...)


def test_printed_config_of_a_keyless_server_says_so(tiny_model_dir, monkeypatch):
    from expertmesh.platform.server.serve_app import app_builder

    monkeypatch.delenv("EXPERTMESH_API_KEY", raising=False)
    (app,) = _config("--model", str(tiny_model_dir), "--no-api-key")["applications"]
    assert app["args"]["allow_no_api_key"] is True
    app_builder(app["args"])  # builds
    (app,) = _config("--model", str(tiny_model_dir))["applications"]
    assert "allow_no_api_key" not in app["args"]


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

    options = app_builder({**app["args"], "api_keys": "k"})._bound_deployment.ray_actor_options
    assert options["num_gpus"] == 1
    cpu_options = app_builder({"model": str(tiny_model_dir), "api_keys": "k"})._bound_deployment.ray_actor_options
    assert cpu_options["num_gpus"] == 0



def test_serve_run_of_the_app_builder_without_a_key_refuses_before_starting_anything(tiny_model_dir, tmp_path):
    """Ray's own `serve run` CLI calls the builder before it starts or joins Ray: without a key it must stop
    there, with our message, instead of serving the API to anyone."""
    env = {k: v for k, v in os.environ.items() if k not in ("EXPERTMESH_API_KEY", "RAY_ADDRESS")}
    serve_cli = Path(sys.executable).with_name("serve")
    r = subprocess.run([str(serve_cli), "run", "expertmesh.platform.server.serve_app:app_builder",
                        f"model={tiny_model_dir}"], capture_output=True, text=True, timeout=120, env=env,
                       cwd=tmp_path)
    assert r.returncode != 0
    assert "no API key is configured" in r.stderr + r.stdout
    assert "Started a local Ray instance" not in r.stderr + r.stdout
