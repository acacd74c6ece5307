"""The LoRA adapters one server replica serves by name, in vLLM's spelling: `--lora-modules name=path` from the
start, `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` at runtime, and a request's `model` naming one.

Each name maps to a `LoRARequest` with an id of its own (never reused, so an id always means one adapter).
Which adapters sit in the engine's `max_loras` slots is the engine's business (its adapters registry): an
adapter evicted from its slot stays served, and the next request naming it loads it again.

Paths: an adapter directory must resolve, symlinks followed, inside one of `--lora-dirs`, and so must the two
files read from it. Without `--lora-dirs` the runtime routes are refused (vLLM keeps them behind an
environment flag): the adapters served are then exactly those of `--lora-modules`, which may live anywhere.
Runtime loading reaches only the replica that takes the request, so it needs a single replica.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

from expertmesh.engine.adapter_registry import AdapterSlotsFull
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.lora_request import LoRARequest
from expertmesh.platform.server import errors
from expertmesh.platform.server.async_engine import AsyncEngine
from expertmesh.platform.server.settings import ServerSettings

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what the engine reads from a directory
MAX_LISTED = 8  # adapter names an unknown model's 404 lists


def parse_lora_modules(texts: list[str], base_names: tuple[str, ...]) -> dict[str, str]:
    """`--lora-modules` items, `name=path` or vLLM's JSON `{"name", "path", "base_model_name"}`, as name -> path;
    a `base_model_name` must be one of `base_names` (this server serves one base model)."""
    modules: dict[str, str] = {}
    for text in texts:
        if text.lstrip().startswith("{"):
            try:
                item = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--lora-modules: {text!r} is not valid JSON: {e}") from None
            unknown = sorted(set(item) - {"name", "path", "base_model_name"}) if isinstance(item, dict) else []
            if not isinstance(item, dict) or unknown or not {"name", "path"} <= set(item):
                raise ValueError(f"--lora-modules: {text!r} must be a JSON object with 'name', 'path' and "
                                 "optionally 'base_model_name'")
            name, path, base = item["name"], item["path"], item.get("base_model_name")
            if base is not None and base not in base_names:
                raise ValueError(f"--lora-modules: adapter {name!r} is for base model {base!r}, but this server "
                                 f"serves {base_names[0]!r}")
        else:
            name, sep, path = text.partition("=")
            if not sep:
                raise ValueError(f"--lora-modules: {text!r} is not name=path (or a JSON object)")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ValueError(f"--lora-modules: {text!r} needs a non-empty name and path")
        if name in modules:
            raise ValueError(f"--lora-modules: the name {name!r} is given twice")
        modules[name] = path
    return modules


def adapter_dirs(lora_dirs: tuple[str, ...]) -> tuple[Path, ...]:
    """The `--lora-dirs`, resolved; each must be a directory."""
    resolved = []
    for d in lora_dirs:
        path = Path(d).resolve()
        if not path.is_dir():
            raise ValueError(f"lora_dirs: {d} is not a directory")
        resolved.append(path)
    return tuple(resolved)


def resolve_adapter_path(path: str, dirs: tuple[Path, ...], field: str) -> str:
    """The adapter directory `path` with every symlink resolved. With `dirs`, it and the files the engine reads
    from it must resolve inside one of them; outside, nothing is said about what exists there."""
    if not Path(path).is_absolute():
        raise ValueError(f"{field} must be an absolute path, got {path!r}")
    real = Path(path).resolve()
    targets = [real] + [(real / name).resolve() for name in ADAPTER_FILES]
    outside = [t for t in targets if dirs and not any(t.is_relative_to(d) for d in dirs)]
    if outside:
        what = "" if outside[0] == real else f" (its {outside[0].name} links to a file there)"
        allowed = ", ".join(str(d) for d in dirs)
        raise ValueError(f"{field} {path} resolves outside the directories adapters may be loaded from "
                         f"(--lora-dirs: {allowed}){what}")
    if not real.is_dir():
        raise ValueError(f"{field} {path} does not exist or is not a directory")
    return str(real)


class ServedAdapters:
    """The adapters this replica serves, by name. Loads and unloads run one at a time, on the event loop."""

    def __init__(self, settings: ServerSettings):
        self.base_names = (settings.model_name, settings.model)
        self.dirs = adapter_dirs(settings.lora_dirs)
        self.retry_after_s = settings.retry_after_s
        self._ids = itertools.count(1)
        self._known: dict[str, LoRARequest] = {}
        for name, path in settings.lora_modules.items():
            real = resolve_adapter_path(path, self.dirs, f"lora_modules[{name!r}]")
            self._known[name] = LoRARequest(name, next(self._ids), real)
        self._lock = asyncio.Lock()

    @property
    def known(self) -> list[LoRARequest]:
        return list(self._known.values())

    def load_startup(self, engine: LLMEngine) -> None:
        """Loads and checks each `--lora-modules` adapter (on the engine's thread, before it serves): a bad one
        stops the replica's start with a ValueError naming it. Past `max_loras` the first ones are evicted again."""
        for request in self._known.values():
            engine.add_lora(request)

    def lookup(self, model: str) -> LoRARequest | None:
        """The adapter a request's `model` names; None for the base model; 404 for anything else."""
        if model in self.base_names:
            return None
        request = self._known.get(model)
        if request is None:
            names = [self.base_names[0], *list(self._known)[:MAX_LISTED]]
            more = f" and {len(self._known) - MAX_LISTED} more adapters" if len(self._known) > MAX_LISTED else ""
            raise errors.APIError(404, f"model {model!r} does not exist; this server serves "
                                       f"{', '.join(map(repr, names))}{more}", param="model", code="model_not_found")
        return request

    async def load(self, engine: AsyncEngine, name: str, path: str) -> tuple[LoRARequest, bool]:
        """Loads the adapter at `path` under `name` (checked whole, into a slot); (its request, whether it is
        new). The same name and path again is a no-op; the name with another path is refused."""
        self._check_runtime_updates()
        if name in self.base_names:
            raise errors.APIError(400, f"lora_name {name!r} is the base model's name; pick another",
                                  param="lora_name")
        try:
            real = resolve_adapter_path(path, self.dirs, "lora_path")
        except ValueError as e:
            raise errors.APIError(400, str(e), param="lora_path") from None
        async with self._lock:
            known = self._known.get(name)
            if known is not None:
                if known.lora_path == real:
                    return known, False
                raise errors.APIError(400, f"a LoRA adapter named {name!r} is already loaded from {known.lora_path}; "
                                           "unload it first to load another under that name", param="lora_name")
            request = LoRARequest(name, next(self._ids), real)
            try:
                await engine.run_in_engine(lambda llm: llm.add_lora(request))
            except AdapterSlotsFull as e:
                raise errors.APIError(429, str(e), code="adapter_slots_full",
                                      headers={"Retry-After": str(self.retry_after_s)}) from None
            except (ValueError, TypeError) as e:
                raise errors.APIError(400, str(e), param="lora_path") from None
            self._known[name] = request
            return request, True

    async def unload(self, engine: AsyncEngine, name: str) -> int:
        """Stops serving `name`: requests naming it get 404 from now on, those already running finish with it,
        and its slot is freed when they have. Returns how many were running."""
        self._check_runtime_updates()
        async with self._lock:
            request = self._known.pop(name, None)
            if request is None:
                base = " (it is the base model)" if name in self.base_names else ""
                raise errors.APIError(404, f"no LoRA adapter named {name!r} is loaded{base}", param="lora_name",
                                      code="model_not_found")
            return await engine.run_in_engine(lambda llm: llm.remove_lora(request.lora_int_id))

    def _check_runtime_updates(self) -> None:
        if not self.dirs:
            raise errors.APIError(403, "loading and unloading LoRA adapters at runtime is off on this server: start "
                                       "it with --lora-dirs DIR (the directories adapters may be loaded from); it "
                                       "serves the adapters of --lora-modules", code="lora_runtime_updates_disabled")
