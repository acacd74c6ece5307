"""An expert shard: some (layer, expert) pairs' weights, the math on them, and its side of the data plane.

`ExpertShard` is the runtime, usable in any process: it loads only its experts from the checkpoint and
answers one layer's request (hidden states, the logical expert ids routed to it, routing weights) with the
weighted sum of its experts' outputs per token. It checks every request against what it holds and the
placement version it was told, and names what does not match. `ExpertShardActor` wraps it as a Ray actor
that serves the gRPC data plane or takes part in a torch.distributed group.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from expertmesh import kernels
from expertmesh.model import LayerExperts, load_experts, resolve_dtype
from expertmesh.model.config import ModelConfig
from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.protos.tensor_codec import from_proto, to_proto


class ShardRequestError(ValueError):
    """A data-plane request this shard cannot serve; the message says what did not match."""


class ExpertShard:
    def __init__(
        self,
        model_dir: str | Path,
        experts: Iterable[tuple[int, int]],
        *,
        dtype: str | torch.dtype = "float32",
        shard_index: int = 0,
        placement_version: int = 0,
        device: str | torch.device = "cpu",
    ):
        config = ModelConfig.from_pretrained(model_dir)
        self.device = torch.device(device)
        self.shard_index = shard_index
        self.placement_version = placement_version
        self.dtype = resolve_dtype(dtype)
        self.hidden_size = config.hidden_size
        self.num_experts = config.routing.num_experts
        self.layers = {  # {layer: LayerExperts}; on a GPU the registry runs them with the Triton fused-MoE kernel
            layer: LayerExperts(held.expert_ids, held.w13.to(self.device), held.w2.to(self.device))
            for layer, held in load_experts(model_dir, experts, self.dtype).items()
        }
        # logical expert id -> row of the stacked weights, or -1 where this shard does not hold it
        self._local: dict[int, torch.Tensor] = {}
        for layer, held in self.layers.items():
            index = torch.full((self.num_experts,), -1, dtype=torch.int64)
            index[list(held.expert_ids)] = torch.arange(len(held.expert_ids))
            self._local[layer] = index

    @property
    def experts(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, held in sorted(self.layers.items()) for e in held.expert_ids]

    def check(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, version: int
    ) -> None:
        """Raises ShardRequestError naming the first thing about a request that does not match this shard."""
        where = f"expert shard {self.shard_index}"
        if version != self.placement_version:
            raise ShardRequestError(
                f"{where} is on placement version {self.placement_version} but the request was routed with "
                f"version {version}"
            )
        if layer not in self.layers:
            raise ShardRequestError(f"{where} holds no experts of layer {layer}; it holds layers {sorted(self.layers)}")
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ShardRequestError(
                f"hidden_states must be [T, {self.hidden_size}] for {where}, got {list(hidden.shape)}"
            )
        if hidden.dtype != self.dtype:
            raise ShardRequestError(f"hidden_states must be {self.dtype} for {where}, got {hidden.dtype}")
        num_tokens = hidden.shape[0]
        if expert_ids.dtype != torch.int64 or expert_ids.dim() != 2 or expert_ids.shape[0] != num_tokens:
            raise ShardRequestError(
                f"expert_ids must be int64 [{num_tokens}, K], got {expert_ids.dtype} {list(expert_ids.shape)}"
            )
        if weights.dtype != torch.float32 or weights.shape != expert_ids.shape:
            raise ShardRequestError(
                f"weights must be float32 {list(expert_ids.shape)}, got {weights.dtype} {list(weights.shape)}"
            )
        ids = expert_ids[expert_ids >= 0]
        out_of_range = ids[ids >= self.num_experts].tolist() + expert_ids[expert_ids < -1].tolist()
        if out_of_range:
            raise ShardRequestError(f"expert_ids {sorted(set(out_of_range))[:5]} are not experts of this model "
                                    f"(0..{self.num_experts - 1}, or -1 for a slot of another shard)")
        missing = ids[self._local[layer][ids] < 0].unique().tolist()
        if missing:
            raise ShardRequestError(f"{where} does not hold experts {missing[:8]} of layer {layer}")

    @torch.inference_mode()
    def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_k(hidden[t]) over the slots this shard holds (ids >= 0): [T, H], on the
        device the inputs came from."""
        held = self.layers[layer]
        tokens, slots = (expert_ids >= 0).nonzero(as_tuple=True)  # one row per routed (token, expert) pair
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        if tokens.numel() == 0:
            return out.to(hidden.dtype)
        local = self._local[layer][expert_ids[tokens, slots]].unsqueeze(1)  # [P, 1]
        dev = self.device
        pair_out = kernels.fused_moe(hidden[tokens].to(dev), held.w13, held.w2,
                                     weights[tokens, slots].unsqueeze(1).to(dev), local.to(dev))
        return out.index_add_(0, tokens, pair_out.float().cpu()).to(hidden.dtype)

    def handle(self, request: pb.ExpertRequest) -> pb.ExpertResponse:
        """One gRPC request in, its response out; ShardRequestError (or ValueError from the codec) if bad."""
        hidden = from_proto(request.hidden_states, name="hidden_states")
        expert_ids = from_proto(request.expert_ids, name="expert_ids")
        weights = from_proto(request.weights, name="weights")
        self.check(request.layer, hidden, expert_ids, weights, request.placement_version)
        start = time.perf_counter()
        out = self.forward(request.layer, hidden, expert_ids, weights)
        return pb.ExpertResponse(step=request.step, layer=request.layer, output=to_proto(out),
                                 compute_seconds=time.perf_counter() - start)


class ExpertShardServicer:
    """The `ExpertShard` gRPC service over one runtime. A bad request ends its stream with INVALID_ARGUMENT
    and the reason; the router reopens a stream for its next request."""

    def __init__(self, shard: ExpertShard):
        self.shard = shard
        self._lock = threading.Lock()  # one request at a time: the kernels already use every thread we have

    def Dispatch(self, request_iterator: Iterator[pb.ExpertRequest], context) -> Iterator[pb.ExpertResponse]:
        import grpc

        for request in request_iterator:
            try:
                with self._lock:
                    response = self.shard.handle(request)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                return
            yield response


def start_grpc_server(shard: ExpertShard, host: str, port: int = 0):
    """Serves `shard` on host:port (0 picks a free port); returns (server, "host:port")."""
    from concurrent import futures

    import grpc

    from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=_GRPC_OPTIONS)
    pb_grpc.add_ExpertShardServicer_to_server(ExpertShardServicer(shard), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"expert shard {shard.shard_index} could not bind a gRPC port on {host}:{port}")
    server.start()
    return server, f"{host}:{bound}"


# Hidden states of a large prefill exceed gRPC's default 4 MiB message limit.
_GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
