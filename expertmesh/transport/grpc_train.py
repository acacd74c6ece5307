"""The fine-tuning worker <-> expert shards data plane over gRPC: the `ExpertShard.Train` stream.

A worker keeps one stream per shard (opened on first use, as the router's serving streams are). Each MoE
layer of a forward sends every shard its tokens (FORWARD) and waits for all the answers; the backward of
that layer sends each shard the gradient of its output (BACKWARD) and gets back the gradients of its inputs.
Every answer is checked against the request it answers (step, layer, call, shapes), so a late or stray one
is never taken for the next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.transport.codec import from_proto, to_proto
from expertmesh.transport.errors import DataPlaneError, PeerFault
from expertmesh.transport.grpc_dispatch import ShardStream
from expertmesh.transport.settings import DataPlaneSettings
from expertmesh.transport.work import ShardWork, TrainRuntime


class GrpcTrainLink:
    def __init__(self, addresses: Mapping[int, str], *, secret: str, settings: DataPlaneSettings, worker: str):
        self.settings, self.worker = settings, worker
        self.streams = {s: ShardStream(s, a, secret, settings, rpc="Train") for s, a in addresses.items()}

    def forward(self, step: int, call: int, layer: int, version: int, works: Sequence[ShardWork],
                keep: bool) -> list[torch.Tensor]:
        """Each work's weighted expert output [Ts, H], in the order of `works`."""
        requests = [pb.TrainRequest(
            phase=pb.TrainRequest.FORWARD, step=step, layer=layer, placement_version=version, worker=self.worker,
            call=call, keep=keep, hidden_states=to_proto(w.hidden_states), expert_ids=to_proto(w.expert_ids),
            weights=to_proto(w.weights)) for w in works]
        answers = self._round_trip(works, requests, step, layer, call)
        return [_tensor(a.output, w, "output", w.hidden_states) for a, w in zip(answers, works)]

    def backward(self, step: int, call: int, layer: int, works: Sequence[ShardWork],
                 grads: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(gradient of each work's hidden states [Ts, H], of its routing weights [Ts, K]), given the gradient
        of each work's output."""
        requests = [pb.TrainRequest(phase=pb.TrainRequest.BACKWARD, step=step, layer=layer, worker=self.worker,
                                    call=call, grad_output=to_proto(g)) for g in grads]
        answers = self._round_trip(works, requests, step, layer, call)
        return [(_tensor(a.output, w, "hidden states' gradient", w.hidden_states),
                 _tensor(a.grad_weights, w, "routing weights' gradient", w.weights)) for a, w in zip(answers, works)]

    def _round_trip(self, works: Sequence[ShardWork], requests: list, step: int, layer: int,
                    call: int) -> list[pb.TrainResponse]:
        unknown = [w.shard for w in works if w.shard not in self.streams]
        if unknown:
            raise DataPlaneError(f"worker {self.worker} has no connection to expert shards {unknown}")
        for w, request in zip(works, requests):
            self.streams[w.shard].send(request)
        answers, error = [], None
        for w in works:  # every answer is read, even after an error, so no stream is left out of step
            stream = self.streams[w.shard]
            try:
                answer = stream.receive(self.settings.timeout_s)
                if (answer.step, answer.layer, answer.call) != (step, layer, call):
                    stream.reset()
                    raise PeerFault(f"expert shard {w.shard} answered step {answer.step} layer {answer.layer} call "
                                    f"{answer.call} to step {step} layer {layer} call {call}", "shard", w.shard)
                answers.append(answer)
            except DataPlaneError as e:
                error = error or e
        if error is not None:
            raise error
        return answers

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


def _tensor(msg: pb.Tensor, work: ShardWork, what: str, like: torch.Tensor) -> torch.Tensor:
    try:
        out = from_proto(msg, name=f"expert shard {work.shard}'s {what}")
    except ValueError as e:
        raise PeerFault(str(e), "shard", work.shard) from None
    if out.shape != like.shape:
        raise PeerFault(f"expert shard {work.shard} sent a {what} of {list(out.shape)}, expected {list(like.shape)}",
                        "shard", work.shard)
    return out


def serve_train_request(trainer: TrainRuntime, request: pb.TrainRequest) -> pb.TrainResponse:
    """A shard's answer to one training request (ValueError naming what does not match)."""
    if request.phase == pb.TrainRequest.FORWARD:
        out = trainer.forward(request.worker, request.step, request.call, request.layer,
                              from_proto(request.hidden_states, name="hidden_states"),
                              from_proto(request.expert_ids, name="expert_ids"),
                              from_proto(request.weights, name="weights"), request.placement_version, request.keep)
        return pb.TrainResponse(step=request.step, layer=request.layer, call=request.call, output=to_proto(out),
                                compute_seconds=trainer.last_compute_s)
    grad_x, grad_w = trainer.backward(request.worker, request.step, request.call, request.layer,
                                      from_proto(request.grad_output, name="grad_output"))
    return pb.TrainResponse(step=request.step, layer=request.layer, call=request.call, output=to_proto(grad_x),
                            grad_weights=to_proto(grad_w), compute_seconds=trainer.last_compute_s)
