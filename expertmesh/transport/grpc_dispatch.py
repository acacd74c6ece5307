"""The router -> expert shards data plane over gRPC.

One persistent bidirectional `ExpertShard.Dispatch` stream per shard, opened on first use and kept;
tensors travel as raw bytes with dtype and shape. Every answer is waited for with a deadline and checked
against the request it answers (step, layer, shape, dtype): a shard that stalls or answers out of step is
named in a PeerFault, and its stream is reset so a late answer can never be read as the next one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping

import torch

from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.transport.auth import call_metadata
from expertmesh.transport.codec import from_proto, to_proto
from expertmesh.transport.errors import DataPlaneError, PeerFault
from expertmesh.transport.settings import DataPlaneSettings
from expertmesh.transport.work import ShardRuntime, ShardWork, TrainRuntime


class ShardStream:
    """A persistent stream to one shard, reopened after an error; a reader thread hands answers over."""

    def __init__(self, shard: int, address: str, secret: str, settings: DataPlaneSettings, rpc: str = "Dispatch"):
        import grpc

        from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc

        self.shard, self.address, self._secret = shard, address, secret
        self.channel = grpc.insecure_channel(address, options=settings.channel_options())
        self.stub = pb_grpc.ExpertShardStub(self.channel)
        self._rpc = rpc  # "Dispatch" (serving) or "Train" (a fine-tuning worker's stream)
        self._requests: queue.SimpleQueue | None = None
        self._answers: queue.SimpleQueue | None = None
        self._call = None

    def _open(self) -> None:
        import grpc

        requests, answers = queue.SimpleQueue(), queue.SimpleQueue()
        call = getattr(self.stub, self._rpc)(iter(requests.get, None), metadata=call_metadata(self._secret))

        def read() -> None:
            try:
                for response in call:
                    answers.put(response)
                answers.put(DataPlaneError(f"expert shard {self.shard} at {self.address} closed its stream"))
            except grpc.RpcError as e:
                answers.put(DataPlaneError(f"expert shard {self.shard} at {self.address}: "
                                           f"{e.code().name}: {e.details()}"))

        threading.Thread(target=read, name=f"dispatch-in-{self.shard}", daemon=True).start()
        self._requests, self._answers, self._call = requests, answers, call

    def send(self, request) -> None:
        if self._requests is None:
            self._open()
        self._requests.put(request)

    def receive(self, timeout_s: float):
        try:
            item = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            self.reset()
            raise PeerFault(f"expert shard {self.shard} at {self.address} did not answer within {timeout_s:g} s",
                            "shard", self.shard) from None
        if isinstance(item, Exception):
            self.reset()
            raise item
        return item

    def reset(self) -> None:
        if self._requests is not None:
            self._requests.put(None)  # ends the request iterator
            self._call.cancel()
        self._requests = self._answers = self._call = None

    def close(self) -> None:
        self.reset()
        self.channel.close()


class GrpcDispatch:
    def __init__(self, addresses: Mapping[int, str], *, secret: str, settings: DataPlaneSettings):
        self.settings, self._secret = settings, secret
        self.streams = {s: ShardStream(s, a, secret, settings) for s, a in addresses.items()}
        self.last_compute_s = 0.0

    def add(self, addresses: Mapping[int, str]) -> None:
        """Connections to more shards (new ones, before a placement gives them work); the others are kept."""
        for s, a in addresses.items():
            if s in self.streams:
                self.streams[s].close()
            self.streams[s] = ShardStream(s, a, self._secret, self.settings)

    def remove(self, shards) -> None:
        """Closes the connections to shards a placement no longer uses."""
        for s in shards:
            stream = self.streams.pop(s, None)
            if stream is not None:
                stream.close()

    def dispatch(self, step, layer, version, works):
        unknown = [w.shard for w in works if w.shard not in self.streams]
        if unknown:  # checked before anything is sent, so no stream is left waiting for a read
            raise DataPlaneError(f"the router has no connection to expert shards {unknown}")
        for w in works:
            request = pb.ExpertRequest(
                step=step, layer=layer, placement_version=version, hidden_states=to_proto(w.hidden_states),
                expert_ids=to_proto(w.expert_ids), weights=to_proto(w.weights),
            )
            if w.slots is not None:
                request.adapter_slots.CopyFrom(to_proto(w.slots))
            self.streams[w.shard].send(request)
        outs, error, compute = [], None, 0.0
        for w in works:  # read every answer even after an error, so no stream is left out of step
            stream = self.streams[w.shard]
            try:
                response = stream.receive(self.settings.timeout_s)
                outs.append(_checked_output(response, step, layer, w))
                compute = max(compute, response.compute_seconds)
            except PeerFault as e:
                stream.reset()
                error = error or e
            except DataPlaneError as e:
                error = error or e
        self.last_compute_s = compute
        if error is not None:
            raise error
        return outs

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


def _checked_output(response: pb.ExpertResponse, step: int, layer: int, work: ShardWork) -> torch.Tensor:
    """The output a shard sent, if it answers this very request; a PeerFault naming the shard otherwise."""
    who = f"expert shard {work.shard}"
    if response.step != step or response.layer != layer:
        raise PeerFault(f"{who} answered step {response.step} layer {response.layer} to the request for step "
                        f"{step} layer {layer}", "shard", work.shard)
    try:
        out = from_proto(response.output, name=f"{who}'s output")
    except ValueError as e:
        raise PeerFault(str(e), "shard", work.shard) from None
    want = work.hidden_states
    if out.shape != want.shape or out.dtype != want.dtype:
        raise PeerFault(f"{who} answered layer {layer} with {out.dtype} {list(out.shape)}, expected {want.dtype} "
                        f"{list(want.shape)}", "shard", work.shard)
    return out


class ExpertShardServicer:
    """The `ExpertShard` gRPC service over one shard runtime. A bad request ends its stream with
    INVALID_ARGUMENT and the reason; the router reopens a stream for its next request. `trainer` gives the
    shard's training mode when a fine-tuning job has started one (None otherwise): `Train` serves it."""

    def __init__(self, runtime: ShardRuntime, trainer: Callable[[], TrainRuntime | None] = lambda: None):
        self.runtime = runtime
        self.trainer = trainer

    def Dispatch(self, request_iterator: Iterator[pb.ExpertRequest], context) -> Iterator[pb.ExpertResponse]:
        import grpc

        for request in request_iterator:
            try:
                hidden = from_proto(request.hidden_states, name="hidden_states")
                expert_ids = from_proto(request.expert_ids, name="expert_ids")
                weights = from_proto(request.weights, name="weights")
                slots = (from_proto(request.adapter_slots, name="adapter_slots")
                         if request.HasField("adapter_slots") else None)
                out = self.runtime.serve(request.layer, hidden, expert_ids, weights, request.placement_version, slots)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                return
            yield pb.ExpertResponse(step=request.step, layer=request.layer, output=to_proto(out),
                                    compute_seconds=self.runtime.last_compute_s)


    def Train(self, request_iterator: Iterator[pb.TrainRequest], context) -> Iterator[pb.TrainResponse]:
        import grpc

        from expertmesh.transport.grpc_train import serve_train_request

        for request in request_iterator:
            trainer = self.trainer()
            if trainer is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"expert shard {self.runtime.shard_index} is not in training mode")
                return
            try:
                yield serve_train_request(trainer, request)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                return


def start_shard_server(runtime: ShardRuntime, host: str, *, secret: str, settings: DataPlaneSettings, port: int = 0,
                       trainer: Callable[[], TrainRuntime | None] = lambda: None):
    """Serves `runtime` (and, once it has one, its training mode `trainer()`) on host:port (0: a free port);
    returns (server, "host:port")."""
    from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc
    from expertmesh.transport.grpc_server import start_server

    return start_server(pb_grpc.add_ExpertShardServicer_to_server, ExpertShardServicer(runtime, trainer), host,
                        secret=secret, settings=settings, what=f"expert-shard-{runtime.shard_index}", port=port)
