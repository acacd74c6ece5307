"""The Ray actors of one model replica, named for what they are so an operator finds them in the dashboard.

Plain classes: `expertmesh.platform.graph` makes them Ray actors (`ray.remote(...).options(...)`) and
is the only caller. The executor makes one call per actor per step (`execute`, `step`, or for the
collective transport `serve_step`); per-layer traffic goes over the data plane they set up here.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from expertmesh.actors.attention import AttentionWorker, MicroBatch
from expertmesh.actors.dispatch import CollectiveDispatch, GrpcDispatch, InProcessDispatch, serve_collective_layer
from expertmesh.actors.expert_shard import ExpertShard, start_grpc_server
from expertmesh.actors.router import RouterCore, StepPlan
from expertmesh.actors.router_link import (
    CollectiveAttentionSide, CollectiveRouterLink, GrpcAttentionSide, GrpcRouterLink, start_router_server,
)
from expertmesh.kernels.cpu_ext import small_m_kernels
from expertmesh.platform.expert_health import expert_health
from expertmesh.platform.placement import PlacementTable

COLLECTIVE_TIMEOUT_S = 120


def _setup(num_threads: int | None) -> ThreadPoolExecutor:
    """Sets torch's threads and loads the CPU kernels; returns the thread that runs this actor's per-step work.

    Ray runs a threaded actor's calls on whichever of its threads is free, and each new calling thread gets
    a fresh OpenMP team: steps measured 25% slower than on one long-lived thread."""
    if num_threads:
        torch.set_num_threads(num_threads)
    small_m_kernels()  # build (or load) the CPU kernels now, not during the first step
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")


def _node() -> dict:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid()}


def _device() -> str:
    """The actor's GPU when Ray gave it one (Ray sets CUDA_VISIBLE_DEVICES to it), else the CPU."""
    import ray

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def _join_group(init_method: str, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    # gloo on host tensors everywhere: the data plane's tensors are staged on the CPU (see DESIGN notes)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


class ExpertShardActor:
    def __init__(self, model_dir: str | Path, experts: list[tuple[int, int]], *, shard_index: int, dtype: str,
                 placement_version: int, num_threads: int | None = None):
        self._step_thread = _setup(num_threads)
        self.shard = ExpertShard(model_dir, experts, dtype=dtype, shard_index=shard_index,
                                 placement_version=placement_version, device=_device())
        self._server = None

    def ping(self) -> dict:
        return {**_node(), "shard": self.shard.shard_index, "num_experts": len(self.shard.experts)}

    def serve_grpc(self) -> str:
        """Starts (once) the ExpertShard service on this node's address; returns "host:port"."""
        if self._server is None:
            self._server, self._address = start_grpc_server(self.shard, _node()["ip"])
        return self._address

    def join_collective(self, init_method: str, rank: int, world_size: int) -> None:
        _join_group(init_method, rank, world_size)

    def serve_step(self, slots: list[tuple[int, int]], router_rank: int = 0) -> None:
        """One step of the collective data plane: each (layer, micro-batch) slot, in the router's order."""
        def serve() -> None:
            for layer, mb in slots:
                serve_collective_layer(self.shard, layer, mb, router_rank)

        self._step_thread.submit(serve).result()


class RouterActor:
    def __init__(self, model_dir: str | Path, placement: dict, *, dtype: str, transport: str,
                 num_threads: int | None = None):
        self._step_thread = _setup(num_threads)
        self.model_dir, self.dtype_name, self.transport = model_dir, dtype, transport
        self.core = RouterCore(model_dir, PlacementTable.from_dict(placement), dtype=dtype)
        self.dispatch = None
        self.attention = None
        self._server = None
        self._ranks: list[int] = []
        self._on_micro_batch = None

    def ping(self) -> dict:
        return {**_node(), "placement_version": self.core.placement.version}

    def serve_attention(self) -> str:
        """Starts (once) the MoERouter service the attention actors stream to; returns "host:port"."""
        if self._server is None:
            self.attention = GrpcAttentionSide()
            self._server, self._address = start_router_server(self.attention, _node()["ip"])
        return self._address

    def host_shards(self, assignment: dict[int, list[tuple[int, int]]]) -> None:
        """The "inprocess" transport: every shard's experts live in this process."""
        shards = [ExpertShard(self.model_dir, assignment[s], dtype=self.dtype_name, shard_index=s,
                              placement_version=self.core.placement.version) for s in sorted(assignment)]
        self.dispatch = InProcessDispatch(shards)

    def connect_shards(self, addresses: list[str]) -> None:
        if self.dispatch is not None:
            self.dispatch.close()
        self.dispatch = GrpcDispatch(addresses)

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind((_node()["ip"], 0))
            return s.getsockname()[1]

    def join_collective(self, init_method: str, world_size: int, attention_ranks: list[int],
                        shard_ranks: list[int]) -> None:
        _join_group(init_method, 0, world_size)
        dispatch = CollectiveDispatch(shard_ranks, self.core.layer_shards, self.core.hidden_size, self.core.dtype)
        self.dispatch = dispatch
        self.attention = CollectiveAttentionSide(attention_ranks, self.core.dtype)
        self._on_micro_batch = lambda mb: setattr(dispatch, "micro_batch", mb)

    def step(self, step: int, plan: StepPlan) -> None:
        if self.dispatch is None or self.attention is None:
            raise RuntimeError("the router's data plane is not connected")
        self._ranks = sorted({r for counts in plan for r in counts})
        self._step_thread.submit(self.core.run_step, step, plan, self.attention, self.dispatch,
                                 self._on_micro_batch).result()

    def abort(self, step: int, reason: str) -> None:
        if self.attention is not None:
            self.attention.fail(step, reason, self._ranks)

    def load_counts(self, window: bool = False) -> dict[int, list[int]]:
        return self.core.load_counts(window)

    def health(self) -> list[dict]:
        """Expert-load health per MoE layer over the recent window (see platform/expert_health.py)."""
        counts = self.core.load_counts(window=True)
        return [h.to_dict() for h in expert_health(counts, self.core.config.routing.top_k)]

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


class AttentionActor:
    def __init__(self, model_dir: str | Path, *, rank: int, dtype: str, num_blocks: int, block_size: int,
                 num_threads: int | None = None):
        _setup(num_threads)  # the worker runs its micro-batches on threads of its own
        self.rank = rank
        self.worker = AttentionWorker(model_dir, dtype=dtype, num_blocks=num_blocks, block_size=block_size)

    def ping(self) -> dict:
        return {**_node(), "rank": self.rank}

    def connect_router(self, address: str) -> None:
        if self.worker.link is not None:
            self.worker.link.close()
        self.worker.link = GrpcRouterLink(address, self.rank)

    def join_collective(self, init_method: str, rank: int, world_size: int) -> None:
        _join_group(init_method, rank, world_size)
        self.worker.link = CollectiveRouterLink(router_rank=0)

    def execute(self, step: int, micro_batches: list[MicroBatch | None]) -> list[np.ndarray | None]:
        """Logits per micro-batch, as numpy arrays: Ray ships those zero-copy through its object store, where
        a torch tensor goes through torch's pickler (measured: 4 MiB of batch-32 logits a step)."""
        return [None if t is None else t.numpy() for t in self.worker.execute(step, micro_batches)]

    def step_timings(self, clear: bool = False) -> list[tuple[float, float]]:
        """(seconds, blocked on routed experts) of recent steps."""
        out = list(self.worker.timings)
        if clear:
            self.worker.timings.clear()
        return out

    def abort(self, step: int, reason: str) -> None:
        if self.worker.link is not None:
            self.worker.link.fail(step, reason)
