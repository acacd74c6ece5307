"""`RouterActor`: the router as a Ray actor. It serves the attention actors' streams, holds the dispatch to
the shards (or, for "inprocess", the shards themselves), and runs each step on one long-lived thread."""

from __future__ import annotations

import socket
from pathlib import Path

from expertmesh.actors._process import node_info, setup
from expertmesh.actors.expert_shard import Expert, ExpertShard
from expertmesh.actors.router import RouterCore
from expertmesh.actors.step import AdapterSpec, StepPlan, StepSlots
from expertmesh.experts import PlacementTable
from expertmesh.transport import DataPlaneSettings
from expertmesh.transport.collective import CollectiveAttentionSide, CollectiveDispatch, join_group
from expertmesh.transport.grpc_dispatch import GrpcDispatch
from expertmesh.transport.grpc_route import GrpcAttentionSide, start_router_server
from expertmesh.transport.inprocess import InProcessDispatch


class RouterActor:
    def __init__(self, model_dir: str | Path, placement: dict, *, dtype: str, transport: str,
                 attention_ranks: list[int], secret: str, data_plane: DataPlaneSettings,
                 num_threads: int | None = None, lora: AdapterSpec | None = None, quantization: str | None = None,
                 activation_dtype: str = "auto"):
        self._step_thread = setup(num_threads)
        self.model_dir, self.dtype_name, self.transport = model_dir, dtype, transport
        self._attention_ranks, self._secret, self._data_plane = list(attention_ranks), secret, data_plane
        table = PlacementTable.from_dict(placement)
        self._lora = lora or AdapterSpec(0, 16, {})  # "inprocess": the hosted shards' adapters
        # "inprocess": the hosted shards quantise their experts and take the activations as the others would
        self._quantization, self._activation_dtype = quantization, activation_dtype
        self.core = RouterCore(model_dir, table, dtype=dtype, activation_dtype=activation_dtype)
        self.dispatch = None
        self.attention = None
        self._server = None
        self._hosted: dict[int, ExpertShard] = {}  # "inprocess": the shards, by index, loaded with the router
        if transport == "inprocess":
            self._hosted = {s: self._new_shard(s, table.shard_experts(s), table.version)
                            for s in range(table.num_shards)}
            self.dispatch = InProcessDispatch(self._hosted)
        self._ranks: list[int] = []
        self._on_micro_batch = None

    def ping(self) -> dict:
        return {**node_info(), "placement_version": self.core.placement.version}

    # -- wiring --------------------------------------------------------------------------------------
    def serve_attention(self, first_step: int) -> str:
        """Starts (once) the MoERouter service the attention actors stream to; returns "host:port"."""
        if self._server is None:
            self.attention = GrpcAttentionSide(self._attention_ranks, dtype=self.core.dtype, settings=self._data_plane,
                                               first_step=first_step)
            self._server, self._address = start_router_server(self.attention, node_info()["ip"], secret=self._secret)
        return self._address

    def connect_shards(self, addresses: dict[int, str]) -> None:
        if self.dispatch is not None:
            self.dispatch.close()
        self.dispatch = GrpcDispatch(addresses, secret=self._secret, settings=self._data_plane)

    def add_shards(self, addresses: dict[int, str]) -> None:
        """Connects new shards ("grpc") beside the others; they get work once a placement names them."""
        if isinstance(self.dispatch, GrpcDispatch):
            self.dispatch.add(addresses)

    def remove_shards(self, shards: list[int]) -> None:
        """Forgets shards that the placement in force no longer names (their connections, or for "inprocess"
        the shards themselves)."""
        if isinstance(self.dispatch, GrpcDispatch):
            self.dispatch.remove(shards)
        for s in shards:
            self._hosted.pop(s, None)

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind((node_info()["ip"], 0))
            return s.getsockname()[1]

    def join_collective(self, init_method: str, world_size: int, attention_ranks: dict[int, int],
                        shard_ranks: dict[int, int]) -> None:
        join_group(init_method, 0, world_size, secret=self._secret, timeout_s=self._data_plane.timeout_s)
        core = self.core
        dispatch = CollectiveDispatch(shard_ranks, lambda layer: core.layer_shards[layer], core.hidden_size,
                                      core.dtype)
        self.dispatch = dispatch
        self.attention = CollectiveAttentionSide(attention_ranks, core.dtype)
        self._on_micro_batch = lambda mb: setattr(dispatch, "micro_batch", mb)

    # -- steps ---------------------------------------------------------------------------------------
    def step(self, step: int, plan: StepPlan, slots: StepSlots | None = None) -> None:
        if self.dispatch is None or self.attention is None:
            raise RuntimeError("the router's data plane is not connected")
        self._ranks = sorted({r for counts in plan for r in counts})
        self._step_thread.submit(self.core.run_step, step, plan, self.attention, self.dispatch,
                                 self._on_micro_batch, slots).result()

    def abort(self, step: int, reason: str) -> None:
        if self.attention is not None:
            self.attention.fail(step, reason, self._ranks)

    # -- placement changes (between steps) -----------------------------------------------------------
    def set_placement(self, placement: dict) -> None:
        self.core.set_placement(PlacementTable.from_dict(placement))

    def stage_hosted(self, shard: int, experts: list[Expert], holding: list[Expert] | None = None) -> list[Expert]:
        """"inprocess": loads new replicas for a hosted shard (and stacks its next holding)."""
        return self._hosted_shard(shard).stage(experts, holding)

    def commit_hosted(self, shard: int, version: int, experts: list[Expert]) -> None:
        self._hosted_shard(shard).commit(version, experts)

    def _hosted_shard(self, shard: int) -> ExpertShard:
        if shard not in self._hosted:  # a shard index new to this router starts empty
            self._hosted[shard] = self._new_shard(shard, [], self.core.placement.version)
        return self._hosted[shard]

    def _new_shard(self, index: int, experts: list[Expert], version: int) -> ExpertShard:
        lora = self._lora
        return ExpertShard(self.model_dir, experts, dtype=self.dtype_name, shard_index=index, placement_version=version,
                           max_loras=lora.max_loras, max_lora_rank=lora.max_rank, adapters=lora.loaded,
                           quantization=self._quantization, activation_dtype=self._activation_dtype)

    # -- LoRA adapters ("inprocess": on the hosted shards) ----------------------------------------------
    def load_adapter(self, slot: int, path: str) -> None:
        """Puts a peft adapter into `slot` on every hosted shard; ValueError naming what does not fit."""
        for shard in self._hosted.values():
            shard.load_adapter(slot, path)
        self._lora = AdapterSpec(self._lora.max_loras, self._lora.max_rank, {**self._lora.loaded, slot: path})

    def clear_adapter(self, slot: int) -> None:
        for shard in self._hosted.values():
            shard.clear_adapter(slot)
        self._lora = AdapterSpec(self._lora.max_loras, self._lora.max_rank,
                                 {s: p for s, p in self._lora.loaded.items() if s != slot})

    # -- figures -------------------------------------------------------------------------------------
    def load_counts(self, window: bool = False) -> dict[int, list[int]]:
        return self.core.load_counts(window)

    def step_timings(self, clear: bool = False) -> list[tuple[float, float, float]]:
        """(seconds, waiting for hidden states, dispatching) of recent steps."""
        out = list(self.core.step_timings)
        if clear:
            self.core.step_timings.clear()
        return out

    def round_trips(self, clear: bool = False) -> list[tuple[int, float, float]]:
        """(tokens, seconds, slowest shard's compute seconds) of recent per-layer dispatch round trips."""
        out = list(self.core.round_trips)
        if clear:
            self.core.round_trips.clear()
        return out
