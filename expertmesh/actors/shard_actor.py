"""`ExpertShardActor`: one expert shard as a Ray actor, serving its side of the data plane."""

from __future__ import annotations

from pathlib import Path

from expertmesh.actors._process import device, node_info, setup
from expertmesh.actors.expert_shard import Expert, ExpertShard
from expertmesh.transport import DataPlaneSettings
from expertmesh.transport.collective import join_group, serve_collective_layer
from expertmesh.transport.grpc_dispatch import start_shard_server


class ExpertShardActor:
    def __init__(self, model_dir: str | Path, experts: list[Expert], *, shard_index: int, dtype: str,
                 placement_version: int, secret: str, data_plane: DataPlaneSettings, num_threads: int | None = None):
        self._step_thread = setup(num_threads)
        self._secret, self._data_plane = secret, data_plane
        self.shard = ExpertShard(model_dir, experts, dtype=dtype, shard_index=shard_index,
                                 placement_version=placement_version, device=device())
        self._server = None

    def ping(self) -> dict:
        return {**node_info(), "shard": self.shard.shard_index, "num_experts": len(self.shard.experts),
                "placement_version": self.shard.placement_version, "pairs_served": self.shard.pairs_served}

    def serve_grpc(self) -> str:
        """Starts (once) the ExpertShard service on this node's address; returns "host:port"."""
        if self._server is None:
            self._server, self._address = start_shard_server(self.shard, node_info()["ip"], secret=self._secret,
                                                             settings=self._data_plane)
        return self._address

    def join_collective(self, init_method: str, rank: int, world_size: int) -> None:
        join_group(init_method, rank, world_size, secret=self._secret, timeout_s=self._data_plane.timeout_s)

    def serve_step(self, slots: list[tuple[int, int]], router_rank: int = 0) -> None:
        """One step of the collective data plane: each (layer, micro-batch) slot, in the router's order."""
        def serve() -> None:
            for layer, mb in slots:
                serve_collective_layer(self.shard, layer, mb, router_rank)

        self._step_thread.submit(serve).result()

    def stage(self, experts: list[Expert]) -> list[Expert]:
        """Loads new replicas by name beside the ones in use; returns those it loaded."""
        return self.shard.stage(experts)

    def commit(self, version: int, experts: list[Expert]) -> None:
        """Between steps: holds exactly `experts` on placement `version` from now on."""
        self.shard.commit(version, experts)
