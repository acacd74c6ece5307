"""`Dispatch`: how the router sends one MoE layer's work to the expert shards and gets their outputs back.

One interface, three transports, chosen by the deployment's `transport`:
- `InProcessDispatch`: the shards' runtimes live in the router's process; a call is a function call.
- `GrpcDispatch`: one persistent bidirectional `ExpertShard.Dispatch` stream per shard, opened when the
  router connects and kept; tensors travel as raw bytes with dtype and shape.
- `CollectiveDispatch`: torch.distributed point-to-point sends and receives in a process group shared
  with the shards (gloo on CPUs, NCCL between GPUs); each shard runs `serve_collective_step` for a step.

Every transport sends all shards their work before waiting for any answer, so the shards run in parallel.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from expertmesh.actors.expert_shard import _GRPC_OPTIONS, ExpertShard
from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.protos.tensor_codec import from_proto, to_proto


class DataPlaneError(RuntimeError):
    """A data-plane peer failed or refused a message; the message names which and why."""


@dataclass(frozen=True, slots=True)
class ShardWork:
    """One shard's part of one MoE layer: the tokens with at least one expert on it."""

    shard: int
    tokens: torch.Tensor  # [Ts] int64 rows of the layer's hidden states
    hidden_states: torch.Tensor  # [Ts, H]
    expert_ids: torch.Tensor  # [Ts, K] int64 logical ids on this shard, -1 for slots on other shards
    weights: torch.Tensor  # [Ts, K] float32


class Dispatch(Protocol):
    # the longest any shard spent on its experts in the last dispatch (0.0 where a transport cannot tell)
    last_compute_s: float

    def dispatch(self, step: int, layer: int, version: int, works: Sequence[ShardWork]) -> list[torch.Tensor]:
        """Each work's weighted expert output [Ts, H], in the order of `works`."""
        ...

    def close(self) -> None: ...


class InProcessDispatch:
    def __init__(self, shards: Sequence[ExpertShard]):
        self.shards = list(shards)
        self.last_compute_s = 0.0

    def dispatch(self, step, layer, version, works):
        outs = []
        start = time.perf_counter()
        for w in works:
            shard = self.shards[w.shard]
            shard.check(layer, w.hidden_states, w.expert_ids, w.weights, version)
            outs.append(shard.forward(layer, w.hidden_states, w.expert_ids, w.weights))
        self.last_compute_s = time.perf_counter() - start  # one after the other: all of it is compute
        return outs

    def close(self) -> None:
        pass


class _ShardStream:
    """A persistent bidirectional stream to one shard, reopened after an error."""

    def __init__(self, shard: int, address: str):
        import grpc

        from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc

        self.shard, self.address = shard, address
        self.channel = grpc.insecure_channel(address, options=_GRPC_OPTIONS)
        self.stub = pb_grpc.ExpertShardStub(self.channel)
        self._requests: queue.SimpleQueue | None = None
        self._responses = None

    def _open(self) -> None:
        self._requests = queue.SimpleQueue()
        self._responses = self.stub.Dispatch(iter(self._requests.get, None))

    def send(self, request: pb.ExpertRequest) -> None:
        if self._requests is None:
            self._open()
        self._requests.put(request)

    def receive(self) -> pb.ExpertResponse:
        import grpc

        try:
            return next(self._responses)
        except grpc.RpcError as e:
            self.reset()
            raise DataPlaneError(f"expert shard {self.shard} at {self.address}: {e.code().name}: {e.details()}") from None
        except StopIteration:
            self.reset()
            raise DataPlaneError(f"expert shard {self.shard} at {self.address} closed its stream") from None

    def reset(self) -> None:
        if self._requests is not None:
            self._requests.put(None)  # ends the request iterator
            self._responses.cancel()
        self._requests = self._responses = None

    def close(self) -> None:
        self.reset()
        self.channel.close()


class GrpcDispatch:
    def __init__(self, addresses: Sequence[str]):
        self.streams = [_ShardStream(i, a) for i, a in enumerate(addresses)]
        self.last_compute_s = 0.0

    def dispatch(self, step, layer, version, works):
        for w in works:
            self.streams[w.shard].send(pb.ExpertRequest(
                step=step, layer=layer, placement_version=version, hidden_states=to_proto(w.hidden_states),
                expert_ids=to_proto(w.expert_ids), weights=to_proto(w.weights),
            ))
        outs, error, compute = [], None, 0.0
        for w in works:  # read every answer even after an error, so no stream is left out of step
            try:
                response = self.streams[w.shard].receive()
                outs.append(from_proto(response.output, name=f"expert shard {w.shard}'s output"))
                compute = max(compute, response.compute_seconds)
            except DataPlaneError as e:
                error = error or e
        self.last_compute_s = compute
        if error is not None:
            raise error
        return outs

    def close(self) -> None:
        for s in self.streams:
            s.close()


# torch.distributed tags of the point-to-point messages, per (layer, micro-batch) slot.
_TAG_KINDS = ("attn_hidden", "attn_out", "shard_header", "shard_hidden", "shard_ids", "shard_weights", "shard_out",
              "shard_time")


def tag(layer: int, micro_batch: int, kind: str) -> int:
    return (layer * 2 + micro_batch) * len(_TAG_KINDS) + _TAG_KINDS.index(kind)


class CollectiveDispatch:
    """Router side of the torch.distributed data plane. `shard_ranks[s]` is shard s's rank in the group."""

    def __init__(self, shard_ranks: Sequence[int], layer_shards: dict[int, list[int]], hidden_size: int,
                 dtype: torch.dtype):
        self.shard_ranks = list(shard_ranks)
        self.layer_shards = layer_shards  # layer -> the shards holding any of its experts
        self.hidden_size, self.dtype = hidden_size, dtype
        self.micro_batch = 0  # set by the router before each dispatch: part of the message tags
        self.last_compute_s = 0.0

    def dispatch(self, step, layer, version, works):
        import torch.distributed as dist

        mb = self.micro_batch
        by_shard = {w.shard: w for w in works}
        self.last_compute_s = 0.0
        sends = []  # (handle, tensor): each tensor kept alive until its send completes
        for shard in self.layer_shards[layer]:  # every shard holding experts of this layer expects a header
            rank, w = self.shard_ranks[shard], by_shard.get(shard)
            if w is None:
                messages = [("shard_header", torch.tensor([0, 0, version], dtype=torch.int64))]
            else:
                num_tokens, top_k = w.expert_ids.shape
                messages = [("shard_header", torch.tensor([num_tokens, top_k, version], dtype=torch.int64)),
                            ("shard_hidden", w.hidden_states.contiguous()), ("shard_ids", w.expert_ids.contiguous()),
                            ("shard_weights", w.weights.contiguous())]
            for kind, t in messages:
                sends.append((dist.isend(t, rank, tag=tag(layer, mb, kind)), t))
        outs, compute = [], torch.zeros(1, dtype=torch.float64)
        for w in works:
            out = torch.empty(w.hidden_states.shape[0], self.hidden_size, dtype=self.dtype)
            dist.recv(out, self.shard_ranks[w.shard], tag=tag(layer, mb, "shard_out"))
            dist.recv(compute, self.shard_ranks[w.shard], tag=tag(layer, mb, "shard_time"))
            outs.append(out)
            self.last_compute_s = max(self.last_compute_s, compute.item())
        for handle, _ in sends:
            handle.wait()
        return outs

    def close(self) -> None:
        pass


def serve_collective_layer(shard: ExpertShard, layer: int, micro_batch: int, router_rank: int) -> None:
    """Shard side of one (layer, micro-batch) of the torch.distributed data plane: a header, then, if any
    token was routed here, the work; answers with the output. A version or shape mismatch raises."""
    import torch.distributed as dist

    header = torch.empty(3, dtype=torch.int64)
    dist.recv(header, router_rank, tag=tag(layer, micro_batch, "shard_header"))
    num_tokens, top_k, version = header.tolist()
    if num_tokens == 0:
        if version != shard.placement_version:
            raise DataPlaneError(f"expert shard {shard.shard_index} is on placement version "
                                 f"{shard.placement_version} but the router routed with version {version}")
        return
    hidden = torch.empty(num_tokens, shard.hidden_size, dtype=shard.dtype)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32)
    dist.recv(hidden, router_rank, tag=tag(layer, micro_batch, "shard_hidden"))
    dist.recv(ids, router_rank, tag=tag(layer, micro_batch, "shard_ids"))
    dist.recv(weights, router_rank, tag=tag(layer, micro_batch, "shard_weights"))
    shard.check(layer, hidden, ids, weights, version)
    start = time.perf_counter()
    out = shard.forward(layer, hidden, ids, weights)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.send(out.contiguous(), router_rank, tag=tag(layer, micro_batch, "shard_out"))
    dist.send(elapsed, router_rank, tag=tag(layer, micro_batch, "shard_time"))
