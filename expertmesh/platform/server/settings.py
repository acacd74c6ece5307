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
    api_keys: tuple[str, ...] = ()  # empty: no key needed
    max_request_bytes: int = 1 << 20
    max_json_depth: int = 32
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's default for completions
    max_waiting: int = 256  # requests queued beyond it get 429
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_json_depth", "max_tokens_limit", "default_max_tokens",
                     "max_waiting", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise ValueError("api_keys must be non-empty strings")

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


def generate_api_key() -> str:
    return "em-" + secrets.token_urlsafe(24)
