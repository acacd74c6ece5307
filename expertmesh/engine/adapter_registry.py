"""The adapters registry: which LoRA adapter each of the executor's `max_loras` slots holds (pure Python).

An unfinished request pins its adapter's slot, so what a running sequence reads is never overwritten. An
adapter not resident goes to a free slot, else to the least recently used slot that no request pins; when
every slot is pinned the request is refused (`AdapterSlotsFull`), naming the adapters that hold them. A
forgotten adapter leaves its slot at once, or when the last request running with it finishes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from expertmesh.engine.lora_request import LoRARequest


class AdapterSlotsFull(ValueError):
    """Every slot holds an adapter of an unfinished request: the adapter can be loaded once one finishes."""


@dataclass(slots=True)
class _Resident:
    request: LoRARequest
    slot: int
    users: int = 0  # unfinished requests that run with it
    forgotten: bool = False  # leaves its slot when the last of its users finishes


class AdapterRegistry:
    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self._resident: OrderedDict[int, _Resident] = OrderedDict()  # by lora_int_id, least recently used first

    def acquire(self, request: LoRARequest, load: Callable[[int], None]) -> int:
        """The slot holding `request`'s adapter, pinned for one more request until `release`. An adapter not
        resident is first put into a slot by `load(slot)`; if that raises, the slot is left free."""
        entry = self._resident.get(request.lora_int_id)
        if entry is not None:
            known = entry.request
            if (known.lora_name, known.lora_path) != (request.lora_name, request.lora_path):
                raise ValueError(
                    f"lora_int_id {request.lora_int_id} is adapter {known.lora_name!r} at {known.lora_path}, not "
                    f"{request.lora_name!r} at {request.lora_path}: give each adapter its own lora_int_id"
                )
            self._resident.move_to_end(request.lora_int_id)
        else:
            slot = self._claim_slot(request)
            load(slot)
            entry = self._resident[request.lora_int_id] = _Resident(request, slot)
        entry.users += 1
        return entry.slot

    def release(self, lora_int_id: int) -> None:
        """One request that ran with the adapter finished; the adapter stays resident until evicted."""
        entry = self._resident[lora_int_id]
        assert entry.users > 0, f"adapter {lora_int_id} released more often than acquired"
        entry.users -= 1
        if entry.forgotten and not entry.users:
            del self._resident[lora_int_id]

    def forget(self, lora_int_id: int) -> int:
        """Drops an adapter from its slot: now when no request runs with it, else once the unfinished requests
        that do (how many: returned) have finished. Its id can still be acquired: it is loaded again if it has left."""
        entry = self._resident.get(lora_int_id)
        if entry is None:
            return 0
        if not entry.users:
            del self._resident[lora_int_id]
        entry.forgotten = True
        return entry.users

    def resident(self) -> dict[int, int]:
        """lora_int_id -> slot, least recently used first."""
        return {key: entry.slot for key, entry in self._resident.items()}

    def pinned(self) -> dict[int, int]:
        """lora_int_id -> unfinished requests using it, for adapters that some request uses."""
        return {key: entry.users for key, entry in self._resident.items() if entry.users}

    def _claim_slot(self, request: LoRARequest) -> int:
        """A free slot, else the least recently used unpinned one, whose adapter is forgotten."""
        used = {entry.slot for entry in self._resident.values()}
        free = [slot for slot in range(self.max_loras) if slot not in used]
        if free:
            return free[0]
        for key, entry in self._resident.items():
            if not entry.users:
                del self._resident[key]
                return entry.slot
        names = ", ".join(repr(entry.request.lora_name) for entry in self._resident.values())
        raise AdapterSlotsFull(
            f"cannot load LoRA adapter {request.lora_name!r}: all max_loras={self.max_loras} slots hold adapters of "
            f"unfinished requests ({names}); raise max_loras or run fewer adapters at once"
        )
