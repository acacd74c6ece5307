"""What the server is told at start: the model, the deployment, the LoRA adapters, the API keys, the limits, how
many replicas."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

API_KEY_ENV = "EXPERTMESH_API_KEY"  # one key, or several separated by commas
DEPLOYMENT_NAME = "ExpertmeshServer"  # the Serve deployment; a Serve config's `deployments:` entry names it
# A replica loads the whole checkpoint (or places a graph of GPU actors) before it answers: minutes on a real
# model. A burst must last this long before Serve starts one (Serve's own default)...
UPSCALE_DELAY_S = 30.0
# ...and a quiet spell this long before it stops one, since getting it back costs those minutes again
DOWNSCALE_DELAY_S = 600.0
# Resident LoRA adapters per replica when the server serves adapters (the offline LLM keeps vLLM's 1): a server
# is shared by many clients, and a request whose adapter finds every slot held by running requests gets 429.
SERVER_MAX_LORAS = 16
_LORA_ENGINE_FIELDS = ("max_loras", "max_lora_rank")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    model: str
    served_model_name: str | None = None  # default: the checkpoint directory's name
    dtype: str = "float32"  # the offline LLM's default, so the same prompt gives the same greedy text
    # None: local mode (the engine in the Serve replica); else the actor graph (a dict or a YAML path)
    deployment: Any = None
    engine_kwargs: dict = field(default_factory=dict)  # EngineConfig fields: max_num_seqs, kv_cache_gib, ...
    # LoRA adapters, served when these or engine_kwargs' enable_lora say so (max_loras, max_lora_rank there too)
    lora_modules: dict = field(default_factory=dict)  # name -> adapter directory, served from the start
    # Directories that adapter paths must resolve into (symlinks followed); runtime loading needs one
    lora_dirs: tuple[str, ...] = ()
    num_threads: int | None = None  # torch threads of the replica's engine; None: the machine's cores
    # One key (a string) or several (a list). Empty: no key is asked for, which the Serve entry points
    # (`app_builder`, the deployment) refuse unless allow_no_api_key says so.
    api_keys: tuple[str, ...] = ()
    allow_no_api_key: bool = False
    max_request_bytes: int = 1 << 20
    max_json_depth: int = 32
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    # The most token entries one request's answer may hold: prompts x n x max_tokens x (1 + logprobs).
    # 2**20: 256 prompts of 4096 tokens, or 12 of them with 20 logprobs alternatives each.
    max_request_work: int = 1 << 20
    default_max_tokens: int = 16  # OpenAI's default for completions
    max_waiting: int = 256  # requests queued beyond it get 429
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_json_depth", "max_tokens_limit", "default_max_tokens",
                     "max_waiting", "retry_after_s", "max_request_work", "num_threads"):
            value = getattr(self, name)
            if name == "num_threads" and value is None:  # left out: every core
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        keys = self.api_keys
        if isinstance(keys, str):  # `api_keys: sekrit` in a Serve config is one key, not six one-letter ones
            keys = (keys,)
        if keys is None:
            keys = ()
        if not isinstance(keys, (list, tuple)) or any(not isinstance(k, str) or not k.strip() for k in keys):
            raise ValueError("api_keys must be a non-empty string (one key) or a list of them")
        object.__setattr__(self, "api_keys", tuple(k.strip() for k in keys))
        if not isinstance(self.allow_no_api_key, bool):
            raise ValueError(f"allow_no_api_key must be true or false, got {self.allow_no_api_key!r}")
        self._check_lora()

    def _check_lora(self) -> None:
        modules, dirs = self.lora_modules, self.lora_dirs
        if not isinstance(modules, dict) or any(not isinstance(k, str) or not k or not isinstance(v, str) or not v
                                                for k, v in modules.items()):
            raise ValueError(f"lora_modules must map adapter names to their directories, got {modules!r}")
        taken = sorted(set(modules) & {self.model_name, self.model})
        if taken:
            raise ValueError(f"lora_modules: the adapter name {taken[0]!r} is the base model's name")
        dirs = (dirs,) if isinstance(dirs, str) else dirs  # `lora_dirs: /adapters` in a Serve config is one
        if not isinstance(dirs, (list, tuple)) or any(not isinstance(d, str) or not d for d in dirs):
            raise ValueError(f"lora_dirs must be a directory or a list of them, got {dirs!r}")
        object.__setattr__(self, "lora_dirs", tuple(dirs))
        enable = self.engine_kwargs.get("enable_lora")
        if enable is False and (modules or dirs):
            raise ValueError("engine_kwargs.enable_lora is false, but lora_modules or lora_dirs name adapters")
        sizes = [name for name in _LORA_ENGINE_FIELDS if name in self.engine_kwargs]
        if sizes and not self.lora_enabled:
            raise ValueError(f"{sizes[0]} sizes the LoRA adapters' slots, but this server serves none: set "
                             "enable_lora (--enable-lora), lora_modules or lora_dirs")

    @property
    def lora_enabled(self) -> bool:
        return bool(self.engine_kwargs.get("enable_lora") or self.lora_modules or self.lora_dirs)

    def engine_config(self):
        """The replica's `EngineConfig`: engine_kwargs over the model and dtype, with LoRA enabled when adapters
        are named (SERVER_MAX_LORAS slots unless max_loras says otherwise)."""
        from expertmesh.engine.llm_engine import EngineConfig  # torch: only where an engine is built

        kwargs = dict(self.engine_kwargs)
        if self.lora_enabled:
            kwargs["enable_lora"] = True
            kwargs.setdefault("max_loras", SERVER_MAX_LORAS)
        return EngineConfig(model=self.model, dtype=self.dtype, **kwargs)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplicaScaling:
    """How many Serve replicas run the app, each with an engine of its own (local mode) or an actor graph of
    its own: `replicas` of them, or Ray Serve's autoscaling between `min_replicas` and `max_replicas`. The
    fields are `expertmesh serve`'s flags of the same names, and the errors name those flags.

    Scaling to zero is refused: the first request after it would wait for a whole checkpoint to load (and,
    in actor mode, for GPU nodes to join), longer than clients wait, and a readiness probe on `/health`
    reaches the replica and so would wake it anyway."""

    replicas: int | None = None  # a fixed count; None and no max_replicas: 1
    min_replicas: int | None = None  # None: 1
    max_replicas: int | None = None  # set: Serve autoscales
    # Serve adds replicas while each holds more ongoing (running + queued) requests than this; the CLI's
    # default is the engine's batch (max_num_seqs): beyond it requests queue in the replica
    target_ongoing_requests: float | None = None
    # more of Serve's AutoscalingConfig fields by their names, over ours (upscale_delay_s, downscale_delay_s)
    autoscaling: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        autoscale_flags = {"--min-replicas": self.min_replicas, "--target-ongoing-requests":
                           self.target_ongoing_requests, "--autoscaling-config": self.autoscaling or None}
        given = [flag for flag, value in autoscale_flags.items() if value is not None]
        if self.replicas is not None and (given or self.max_replicas is not None):
            raise ValueError("--replicas (a fixed count) and --min-replicas/--max-replicas (autoscaling) exclude "
                             "each other: give one or the other")
        if self.max_replicas is None and given:
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for autoscaling: give "
                             "--max-replicas too (the most replicas Serve may run)")
        if self.min_replicas == 0:
            raise ValueError("--min-replicas must be at least 1, got 0: scaling to zero would make the next "
                             "request wait for a whole checkpoint to load (and a /health probe wakes it anyway)")
        for flag, value in (("--replicas", self.replicas), ("--min-replicas", self.min_replicas),
                            ("--max-replicas", self.max_replicas)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} must be an integer of at least 1, got {value!r}")
        if self.max_replicas is not None and self.lowest > self.max_replicas:
            raise ValueError(f"--min-replicas ({self.lowest}) is more than --max-replicas ({self.max_replicas})")
        target = self.target_ongoing_requests
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0):
            raise ValueError(f"--target-ongoing-requests must be a number above 0, got {target!r}")
        if self.autoscales:
            self._check_autoscaling()

    def _check_autoscaling(self) -> None:
        """Serve's own validation of what Serve will be given, and no field it would ignore."""
        from pydantic import ValidationError
        from ray.serve.config import AutoscalingConfig

        if not isinstance(self.autoscaling, dict):
            raise ValueError(f"--autoscaling-config must be a mapping of AutoscalingConfig fields, got "
                             f"{self.autoscaling!r}")
        ours = {"min_replicas": "--min-replicas", "max_replicas": "--max-replicas",
                "target_ongoing_requests": "--target-ongoing-requests"}
        taken = sorted(set(self.autoscaling) & set(ours))
        if taken:
            raise ValueError(f"--autoscaling-config: set {', '.join(taken)} with {', '.join(ours[k] for k in taken)} "
                             "instead")
        unknown = sorted(set(self.autoscaling) - set(AutoscalingConfig.model_fields))
        if unknown:
            raise ValueError(f"--autoscaling-config: unknown fields {unknown}; Serve's AutoscalingConfig has "
                             f"{sorted(set(AutoscalingConfig.model_fields) - set(ours))}")
        try:
            AutoscalingConfig(**self.autoscaling_config())
        except ValidationError as e:
            wrong = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'autoscaling'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"--autoscaling-config: {wrong}") from None

    @property
    def autoscales(self) -> bool:
        return self.max_replicas is not None

    @property
    def lowest(self) -> int:
        return self.replicas or self.min_replicas or 1

    @property
    def most(self) -> int:
        """The most replicas that may run at once: what the cluster must find room for."""
        return self.max_replicas or self.lowest

    def autoscaling_config(self) -> dict:
        assert self.autoscales, "a fixed replica count has no autoscaling config"
        config = {"min_replicas": self.lowest, "max_replicas": self.max_replicas}
        if self.target_ongoing_requests is not None:
            config["target_ongoing_requests"] = self.target_ongoing_requests
        config.update(upscale_delay_s=UPSCALE_DELAY_S, downscale_delay_s=DOWNSCALE_DELAY_S)
        return {**config, **self.autoscaling}

    def serve_options(self) -> dict:
        """The deployment options Serve takes, in `serve.deployment(...)` or a Serve config's `deployments:`."""
        if self.autoscales:
            return {"autoscaling_config": self.autoscaling_config()}
        return {"num_replicas": self.lowest}


def check_runtime_lora(settings: ServerSettings, scaling: ReplicaScaling) -> None:
    """Adapters loaded at runtime reach only the replica that takes the load request, so lora_dirs (which turns
    runtime loading on) needs a single replica."""
    if settings.lora_dirs and scaling.most > 1:
        raise ValueError(f"--lora-dirs turns on loading LoRA adapters at runtime, which reaches only the replica that "
                         f"takes the request, but up to {scaling.most} replicas may run: name the adapters with "
                         "--lora-modules instead, or run one replica")


def read_api_keys(key_file: str | None = None, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """Keys from a file (one per line, '#' comments) and from $EXPERTMESH_API_KEY (comma-separated)."""
    env = os.environ if env is None else env
    keys: list[str] = []
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise ValueError(f"API key file {key_file} does not exist")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
        if not keys:
            raise ValueError(f"API key file {key_file} holds no key")
    keys.extend(k.strip() for k in env.get(API_KEY_ENV, "").split(",") if k.strip())
    return tuple(dict.fromkeys(keys))


def require_api_key(settings: ServerSettings) -> None:
    """Fails closed: a server that would answer everyone must have been told so."""
    if not settings.api_keys and not settings.allow_no_api_key:
        raise ValueError(
            f"no API key is configured: set api_keys (one key or a list), api_key_file, or ${API_KEY_ENV} in the "
            "environment of the process that builds the app; or set allow_no_api_key: true to serve without "
            "keys on purpose")


def generate_api_key() -> str:
    return "em-" + secrets.token_urlsafe(24)
