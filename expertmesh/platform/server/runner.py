"""`expertmesh serve`: start (or join) Ray, deploy the Serve app, print how to reach it, wait for a signal.

With no RAY_ADDRESS it starts a private Ray of its own on 127.0.0.1 (`address="local"`, never a stale
cluster) and on SIGTERM or Ctrl-C takes Serve and that Ray down again before exiting.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from expertmesh.platform.server.settings import (
    DEPLOYMENT_NAME,
    ReplicaScaling,
    ServerSettings,
    check_runtime_lora,
    generate_api_key,
    read_api_keys,
)

SHUTDOWN_DEADLINE_S = 60
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): \S")  # `ValueError: what`


def settings_from_args(args) -> ServerSettings:
    keys = read_api_keys(args.api_key_file)
    if not keys and not args.no_api_key:
        keys = (generate_api_key(),)
    engine_kwargs = {}
    for name in ("max_num_seqs", "max_model_len", "kv_cache_gib", "device", "max_loras", "max_lora_rank",
                 "quantization", "kv_cache_dtype", "activation_dtype"):
        value = getattr(args, name, None)
        if value is not None:
            engine_kwargs[name] = value
    if getattr(args, "enable_lora", False):
        engine_kwargs["enable_lora"] = True
    model = str(Path(args.model).resolve())
    lora_modules = {}
    if getattr(args, "lora_modules", None):
        from expertmesh.platform.server.lora import parse_lora_modules

        names = (args.served_model_name or Path(model).name, model)
        # relative paths are the caller's: made absolute here, as the model's is
        lora_modules = {name: str(Path(path).absolute())
                        for name, path in parse_lora_modules(args.lora_modules, names).items()}
    return ServerSettings(
        model=model, served_model_name=args.served_model_name, dtype=args.dtype,
        deployment=str(Path(args.deployment).resolve()) if args.deployment else None,
        engine_kwargs=engine_kwargs, lora_modules=lora_modules,
        lora_dirs=tuple(str(Path(d).resolve()) for d in getattr(args, "lora_dirs", None) or ()),
        api_keys=keys, allow_no_api_key=bool(args.no_api_key),
        max_waiting=args.max_waiting, max_tokens_limit=args.max_tokens_limit, max_request_work=args.max_request_work,
        num_threads=getattr(args, "num_threads", None),
    )


def scaling_from_args(args) -> ReplicaScaling:
    """--replicas, or --min/--max-replicas with Serve's autoscaling aimed at the engine's batch: a replica
    holding more requests than it decodes at once queues them, and another replica would run them now."""
    target = args.target_ongoing_requests
    if args.max_replicas is not None:
        from dataclasses import fields

        from expertmesh.engine.llm_engine import EngineConfig

        batch = args.max_num_seqs or next(f.default for f in fields(EngineConfig) if f.name == "max_num_seqs")
        holds = batch + args.max_waiting  # beyond it the replica answers 429, and Serve never sees more load
        if target is None:
            target = batch
        elif target > holds:
            raise ValueError(f"--target-ongoing-requests ({target:g}) is more than a replica holds: --max-num-seqs "
                             f"({batch}) + --max-waiting ({args.max_waiting}) = {holds}")
    autoscaling = {}
    if args.autoscaling_config is not None:
        try:
            autoscaling = yaml.safe_load(args.autoscaling_config) or {}
        except yaml.YAMLError:
            raise ValueError(f"--autoscaling-config is not JSON (or YAML): {args.autoscaling_config!r}") from None
    return ReplicaScaling(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                          target_ongoing_requests=target, autoscaling=autoscaling)


def serve_config(settings: ServerSettings, host: str, port: int, scaling: ReplicaScaling | None = None) -> dict:
    """A Serve config file for `serve deploy` / `serve run` on an existing cluster, with these settings
    (API keys left out: give the cluster `EXPERTMESH_API_KEY` or an `api_key_file`; without either the app
    refuses to start unless the config says `allow_no_api_key: true`, which --no-api-key writes). The replica
    count or autoscaling goes in the application's `deployments:` entry, where Serve applies a change to it
    without restarting the replicas (a change to `args` rebuilds them all)."""
    args = {"model": settings.model, "dtype": settings.dtype}
    if settings.served_model_name:
        args["served_model_name"] = settings.served_model_name
    if settings.deployment is not None:
        # inlined, so the config is whole on a cluster that has no copy of the file; checked first
        from expertmesh.graph import DeploymentConfig

        deployment = settings.deployment
        if not isinstance(deployment, dict):
            deployment = yaml.safe_load(Path(deployment).read_text()) or {}
        DeploymentConfig.from_dict(deployment)
        args["deployment"] = deployment
    if settings.engine_kwargs:
        args["engine_kwargs"] = dict(settings.engine_kwargs)
    if settings.num_threads is not None:
        args["num_threads"] = settings.num_threads
    if settings.lora_modules:
        args["lora_modules"] = dict(settings.lora_modules)
    if settings.lora_dirs:
        args["lora_dirs"] = list(settings.lora_dirs)
    if settings.allow_no_api_key and not settings.api_keys:  # said on purpose (--no-api-key): keep saying it
        args["allow_no_api_key"] = True
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": "expertmesh", "route_prefix": "/",
            "import_path": "expertmesh.platform.server.serve_app:app_builder", "args": args,
            "deployments": [{"name": DEPLOYMENT_NAME, **(scaling or ReplicaScaling()).serve_options()}],
        }],
    }


def _cluster_cpus(settings: ServerSettings, scaling: ReplicaScaling) -> float:
    """Logical CPUs the Ray we start needs at least: each replica's, plus its deployment's actors (they spend
    much of a step waiting on one another, so a machine with fewer cores still runs them), for the most
    replicas that may run."""
    per_replica = 1.0
    if settings.deployment is not None:
        from expertmesh.graph import DeploymentConfig

        per_replica += DeploymentConfig.load(settings.deployment).total_cpus
    return per_replica * scaling.most


def run(args) -> int:
    settings = settings_from_args(args)
    scaling = scaling_from_args(args)
    check_runtime_lora(settings, scaling)
    if args.print_serve_config:
        print(yaml.safe_dump(serve_config(settings, args.host, args.port, scaling), sort_keys=False), end="")
        return 0
    if settings.lora_enabled:
        from expertmesh.platform.server.lora import ServedAdapters

        ServedAdapters(settings)  # the adapters' paths and --lora-dirs, checked before Ray starts
    from expertmesh.graph import runtime
    from ray import serve

    from expertmesh.platform.server.serve_app import APP_NAME, build_application

    # Ray starts its workers at niceness 15; the replica here is the server itself, so it should not yield
    # its cores to whatever else runs on the machine (Ray's job manager does the same for drivers)
    owns_ray = runtime.connect(num_cpus=_cluster_cpus(settings, scaling), log_to_driver=args.verbose, worker_niceness=0)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"loading {settings.model} ...", flush=True)
        try:
            serve.run(build_application(settings, scaling=scaling), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError:  # Serve says only that the deployment failed: say why (a bad adapter, a bad checkpoint)
            reason = _replica_error(serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message)
            if reason is None:
                raise
            raise ValueError(f"the server's replica could not start: {reason}") from None
        _print_banner(settings, scaling, args.host, args.port)
        while not stop.is_set():
            stop.wait(0.5)
        print("shutting down ...", flush=True)
    finally:
        _shutdown(serve, runtime, owns_ray)
    return 0


def _replica_error(message: str) -> str | None:
    """The last `SomeError: what` line of the traceback in a deployment's status message, if it has one."""
    lines = [line for line in message.splitlines() if _EXCEPTION_LINE.match(line)]
    return lines[-1] if lines else None


def _shutdown(serve, runtime, owns_ray: bool) -> None:
    def force_exit():  # a hung shutdown must not keep the process past the deadline
        time.sleep(SHUTDOWN_DEADLINE_S - 5)
        print("shutdown took too long; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=force_exit, daemon=True).start()
    try:
        serve.shutdown()
    finally:
        runtime.disconnect(owns_ray)


def _print_banner(settings: ServerSettings, scaling: ReplicaScaling, host: str, port: int) -> None:
    url = f"http://{host}:{port}"
    auth = f" -H 'Authorization: Bearer {settings.api_keys[0]}'" if settings.api_keys else ""
    print(f"expertmesh is serving {settings.model_name!r} at {url}/v1", flush=True)
    if scaling.autoscales:
        config = scaling.autoscaling_config()
        print(f"replicas: {config['min_replicas']} to {config['max_replicas']}, autoscaled by Serve (target "
              f"{config['target_ongoing_requests']:g} ongoing requests each)")
    else:
        print(f"replicas: {scaling.lowest}")
    if settings.api_keys:
        print(f"API key: {settings.api_keys[0]}")
    key_q = f"#key={settings.api_keys[0]}" if settings.api_keys else ""  # a fragment: never sent to the server
    print(f"dashboard: {url}/dashboard{key_q}")
    print("try:")
    print(f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"model\": \"{settings.model_name}\", \"prompt\": \"The mixture of experts\", \"max_tokens\": 16}}'")
    print("Ctrl-C stops it.", flush=True)
