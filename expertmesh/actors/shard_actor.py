"""`ExpertShardActor`: one expert shard as a Ray actor, serving its side of the data plane. A fine-tuning job
puts it in training mode (`start_training`): the same actor, experts and data plane, with the adapters of its
chosen experts and their optimizer state held here."""

from __future__ import annotations

from pathlib import Path

from expertmesh.actors._process import device, node_info, setup
from expertmesh.actors.expert_shard import Expert, ExpertShard
from expertmesh.actors.shard_trainer import AdapterTensors, ShardTrainer
from expertmesh.actors.step import AdapterSpec
from expertmesh.transport import DataPlaneSettings
from expertmesh.transport.collective import join_group, serve_collective_layer
from expertmesh.transport.grpc_dispatch import start_shard_server


class ExpertShardActor:
    def __init__(self, model_dir: str | Path, experts: list[Expert], *, shard_index: int, dtype: str,
                 placement_version: int, secret: str, data_plane: DataPlaneSettings, num_threads: int | None = None,
                 lora: AdapterSpec | None = None, quantization: str | None = None, activation_dtype: str = "auto"):
        self._step_thread = setup(num_threads)
        self._secret, self._data_plane = secret, data_plane
        lora = lora or AdapterSpec(0, 16, {})
        self.shard = ExpertShard(model_dir, experts, dtype=dtype, shard_index=shard_index,
                                 placement_version=placement_version, device=device(), max_loras=lora.max_loras,
                                 max_lora_rank=lora.max_rank, adapters=lora.loaded, quantization=quantization,
                                 activation_dtype=activation_dtype)
        self._server = None
        self.trainer: ShardTrainer | None = None

    def ping(self) -> dict:
        return {**node_info(), "shard": self.shard.shard_index, "num_experts": len(self.shard.experts),
                "placement_version": self.shard.placement_version, "pairs_served": self.shard.pairs_served}

    def serve_grpc(self) -> str:
        """Starts (once) the ExpertShard service on this node's address; returns "host:port"."""
        if self._server is None:
            self._server, self._address = start_shard_server(self.shard, node_info()["ip"], secret=self._secret,
                                                             settings=self._data_plane, trainer=lambda: self.trainer)
        return self._address

    def join_collective(self, init_method: str, rank: int, world_size: int) -> None:
        join_group(init_method, rank, world_size, secret=self._secret, timeout_s=self._data_plane.timeout_s)

    def serve_step(self, slots: list[tuple[int, int]], router_rank: int = 0) -> None:
        """One step of the collective data plane: each (layer, micro-batch) slot, in the router's order."""
        def serve() -> None:
            for layer, mb in slots:
                serve_collective_layer(self.shard, layer, mb, router_rank)

        self._step_thread.submit(serve).result()

    def stage(self, experts: list[Expert], holding: list[Expert] | None = None) -> list[Expert]:
        """Loads new replicas by name beside the ones in use (and stacks `holding`, the shard's next holding,
        for a commit that only swaps it in); returns those it loaded."""
        return self.shard.stage(experts, holding)

    def commit(self, version: int, experts: list[Expert]) -> None:
        """Between steps: holds exactly `experts` on placement `version` from now on."""
        self.shard.commit(version, experts)

    # -- LoRA adapters at serving --------------------------------------------------------------------
    def load_adapter(self, slot: int, path: str) -> int:
        """Puts a peft adapter into `slot` for the experts held here; returns how many it adapts."""
        return self.shard.load_adapter(slot, path)

    def clear_adapter(self, slot: int) -> None:
        self.shard.clear_adapter(slot)

    # -- training mode (a fine-tuning job) -------------------------------------------------------------
    def start_training(self, adapters: dict[Expert, AdapterTensors], rank: int, alpha: float,
                       weight_decay: float = 0.0) -> int:
        """Enters training mode (again: a restarted job starts over) with these initial adapters; returns how
        many experts here carry one."""
        self.trainer = ShardTrainer(self.shard, adapters, rank=rank, alpha=alpha, weight_decay=weight_decay)
        return sum(len(e) for e in self.trainer.chosen.values())

    def stop_training(self) -> None:
        self.trainer = None

    def apply_step(self, step: int, lr: float) -> None:
        self._training().apply(step, lr)

    def trained_adapters(self) -> dict[Expert, AdapterTensors]:
        return self._training().adapters()

    def train_state(self) -> dict:
        return self._training().state()

    def load_train_state(self, state: dict) -> None:
        self._training().load_state(state)

    def _training(self) -> ShardTrainer:
        if self.trainer is None:
            raise RuntimeError(f"expert shard {self.shard.shard_index} is not in training mode")
        return self.trainer
