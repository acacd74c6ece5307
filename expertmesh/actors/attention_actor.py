"""`AttentionActor`: an attention worker as a Ray actor, on the GPU Ray gave it (else the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from expertmesh.actors._process import device, node_info, setup
from expertmesh.actors.attention import AttentionWorker
from expertmesh.actors.step import AdapterSpec, MicroBatch
from expertmesh.transport import DataPlaneSettings
from expertmesh.transport.collective import CollectiveRouterLink, join_group
from expertmesh.transport.grpc_route import GrpcRouterLink


class AttentionActor:
    def __init__(self, model_dir: str | Path, *, rank: int, dtype: str, num_blocks: int, block_size: int,
                 secret: str, data_plane: DataPlaneSettings, num_threads: int | None = None,
                 lora: AdapterSpec | None = None, kv_cache_dtype: str = "auto", quantization: str | None = None,
                 activation_dtype: str = "auto"):
        setup(num_threads)  # the worker runs its micro-batches on threads of its own
        self.rank, self._secret, self._data_plane = rank, secret, data_plane
        self.worker = AttentionWorker(model_dir, dtype=dtype, num_blocks=num_blocks, block_size=block_size,
                                      device=device(), lora=lora, kv_cache_dtype=kv_cache_dtype,
                                      quantization=quantization, activation_dtype=activation_dtype)

    def ping(self) -> dict:
        return {**node_info(), "rank": self.rank, "device": str(self.worker.device)}

    def connect_router(self, address: str) -> None:
        if self.worker.link is not None:
            self.worker.link.close()
        self.worker.link = GrpcRouterLink(address, self.rank, secret=self._secret, settings=self._data_plane)

    def join_collective(self, init_method: str, rank: int, world_size: int) -> None:
        join_group(init_method, rank, world_size, secret=self._secret, timeout_s=self._data_plane.timeout_s)
        self.worker.link = CollectiveRouterLink(router_rank=0)

    def execute(self, step: int, micro_batches: list[MicroBatch | None]) -> list[np.ndarray | None]:
        """Logits per micro-batch, as numpy arrays: Ray ships those zero-copy through its object store, where
        a torch tensor goes through torch's pickler (measured: 4 MiB of batch-32 logits a step)."""
        return [None if t is None else t.numpy() for t in self.worker.execute(step, micro_batches)]

    def load_adapter(self, slot: int, path: str) -> None:
        """Puts a peft adapter into `slot` for this actor's layers; ValueError naming what does not fit."""
        self.worker.adapters.load(slot, path)

    def clear_adapter(self, slot: int) -> None:
        self.worker.adapters.clear(slot)

    def reconnects(self) -> int:
        """How often this actor's router stream broke and was reopened."""
        return 0 if self.worker.link is None else self.worker.link.reconnects

    def step_timings(self, clear: bool = False) -> list[tuple[float, float]]:
        """(seconds, blocked on routed experts) of recent steps."""
        out = list(self.worker.timings)
        if clear:
            self.worker.timings.clear()
        return out

    def abort(self, step: int, reason: str) -> None:
        if self.worker.link is not None:
            self.worker.link.fail(step, reason)
