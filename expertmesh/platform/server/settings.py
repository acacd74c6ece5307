"""What the server is told at start: the model, the deployment, the API keys, the limits."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

API_KEY_ENV = "EXPERTMESH_API_KEY"  # one key, or several separated by commas


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    model: str
    served_model_name: str | None = None  # default: the checkpoint directory's name
    dtype: str = "float32"  # the offline LLM's default, so the same prompt gives the same greedy text
    # None: local mode (the engine in the Serve replica); else the actor graph (a dict or a YAML path)
    deployment: Any = None
    engine_kwargs: dict = field(default_factory=dict)  # EngineConfig fields: max_num_seqs, kv_cache_gib, ...
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
                     "max_waiting", "retry_after_s", "max_request_work"):
            value = getattr(self, name)
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

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name


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
