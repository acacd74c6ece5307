"""`LoRARequest`, in vLLM's spelling: which LoRA adapter a request runs with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """A peft adapter directory (`adapter_config.json` + `adapter_model.safetensors`) made for this model.

    `lora_int_id` (>= 1) identifies the adapter: requests with the same id share one resident copy, so one id
    must always name the same adapter. `lora_local_path` is vLLM's deprecated spelling of `lora_path`."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_local_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not self.lora_path and self.lora_local_path:
            object.__setattr__(self, "lora_path", str(self.lora_local_path))
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must name the adapter's directory, got {self.lora_path!r}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
