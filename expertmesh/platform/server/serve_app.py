"""The Ray Serve deployment: one replica owns an engine (local, or driving an actor graph) and serves the app.

For `serve run` / `serve deploy` on an existing cluster, `app_builder` takes the same settings as
`expertmesh serve` (see `expertmesh serve --print-serve-config`):

    serve run expertmesh.platform.server.serve_app:app_builder model=/models/tiny
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import expertmesh.graph.runtime  # noqa: F401 - first: it sets Ray's environment before Ray loads
from ray import serve  # noqa: I001

from expertmesh.platform.server.settings import (
    DEPLOYMENT_NAME,
    ReplicaScaling,
    ServerSettings,
    check_runtime_lora,
    require_api_key,
)

APP_NAME = "expertmesh"
RESTART_AFTER_FAILED_STEPS = 5  # liveness: a replica whose steps keep failing is restarted by Serve
MAX_ONGOING_REQUESTS = 1024  # per replica; the engine's own queue (max_waiting) answers 429 first


@serve.ingress()
class ExpertmeshServer:
    """Owns an `AsyncEngine` and builds the FastAPI app around it when the replica starts."""

    def __init__(self, settings: dict[str, Any]):
        import torch

        from expertmesh.engine.llm_engine import LLMEngine
        from expertmesh.graph import ActorGraph
        from expertmesh.platform.server.async_engine import AsyncEngine
        from expertmesh.platform.server.lora import ServedAdapters

        self.settings = ServerSettings(**settings)
        require_api_key(self.settings)  # the deployment itself fails closed, however it was built
        s = self.settings
        # Ray gives a 1-CPU actor OMP_NUM_THREADS=1; local mode computes here, so use the machine's cores
        torch.set_num_threads(int(s.num_threads or os.cpu_count() or 1))
        torch.manual_seed(0)  # as the offline LLM does: unseeded sampling draws from the global generator
        executor = None if s.deployment is None else ActorGraph(s.deployment)
        self.adapters = ServedAdapters(s)  # checks the adapters' paths against lora_dirs

        def make_engine() -> LLMEngine:
            engine = LLMEngine(s.engine_config(), executor)
            try:
                self.adapters.load_startup(engine)
            except BaseException:
                engine.shutdown()
                raise
            return engine

        self.engine = AsyncEngine(make_engine, max_waiting=s.max_waiting, retry_after_s=s.retry_after_s)

    def __serve_build_asgi_app__(self):
        from expertmesh.platform.server.app import build_app

        # Serve's proxy echoes the request id
        return build_app(self.engine, self.settings, adapters=self.adapters, echo_request_id=False)

    def check_health(self) -> None:
        """Ray Serve's liveness check, which restarts a replica that fails it: a stopped engine fails it, and
        so does a run of failed steps that recovery did not end (every request is failing anyway). A dead
        actor of the graph does not: the executor replaces it and retries the step, and restarting the
        replica would drop every open stream. `GET /health` (readiness) reports dead actors."""
        if not self.engine.alive:
            raise RuntimeError(f"engine stopped: {self.engine.error or 'shut down'}")
        failed = self.engine.stats.failed_in_a_row
        if failed >= RESTART_AFTER_FAILED_STEPS:
            raise RuntimeError(f"the last {failed} steps failed; restarting the replica")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def build_application(settings: ServerSettings, *, num_cpus: float = 1.0, scaling: ReplicaScaling | None = None):
    """The Serve application for `serve.run`: one replica unless `scaling` says otherwise (a Serve config's
    `deployments:` entry overrides it, as `expertmesh serve --print-serve-config` writes). Each replica builds
    an engine of its own and, with a deployment, an actor graph of its own: the graph's actor names carry a
    fresh graph id, its data-plane ports are picked by the OS and its token is its own."""
    check_runtime_lora(settings, scaling or ReplicaScaling())
    # an engine on a GPU needs Ray to give its replica one (Ray hides the GPUs from actors that ask for none)
    num_gpus = 1 if str(settings.engine_kwargs.get("device", "cpu")).startswith("cuda") else 0
    deployment = serve.deployment(
        ExpertmeshServer, name=DEPLOYMENT_NAME, max_ongoing_requests=MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}, health_check_period_s=10, health_check_timeout_s=60,
        graceful_shutdown_timeout_s=20, **(scaling or ReplicaScaling()).serve_options(),
    )
    return deployment.bind(asdict(settings))


def app_builder(args: dict[str, Any]):
    """`serve run expertmesh.platform.server.serve_app:app_builder model=DIR [deployment=deploy.yaml] ...`:
    the fields of ServerSettings, plus `api_key_file`. Keys: `api_keys` (one key or a list), the file, and
    $EXPERTMESH_API_KEY where the app is built; with none of them it refuses to build unless given
    `allow_no_api_key: true`."""
    from expertmesh.platform.server.settings import read_api_keys

    args = dict(args)
    key_file = args.pop("api_key_file", None)
    given = args.pop("api_keys", None)
    given = () if given is None else (given,) if isinstance(given, str) else tuple(given)
    if isinstance(args.get("allow_no_api_key"), str):  # `serve run ... allow_no_api_key=true` passes text
        flag = args["allow_no_api_key"].strip().lower()
        if flag not in ("true", "false"):
            raise ValueError(f"allow_no_api_key must be true or false, got {args['allow_no_api_key']!r}")
        args["allow_no_api_key"] = flag == "true"
    keys = tuple(dict.fromkeys(given + read_api_keys(key_file)))
    num_cpus = float(args.pop("replica_num_cpus", 1.0))
    known = set(ServerSettings.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(known | {'api_key_file', 'replica_num_cpus'})}")
    if "model" not in args:
        raise ValueError("the application needs model=DIR (a checkpoint directory)")
    settings = ServerSettings(**args, api_keys=keys)
    require_api_key(settings)
    return build_application(settings, num_cpus=num_cpus)
