"""The attention actors <-> router data plane over gRPC, per MoE layer of each micro-batch.

An attention actor `submit`s a micro-batch's normalized hidden states for a layer and gets back a pending
result it waits on after computing its shared experts. The router `receive`s each attention actor's part,
runs the layer's routed experts over all of them at once, and `reply`s. One persistent `MoERouter.Route`
stream per attention actor carries both ways. A stream that breaks (a reset connection, or a second
connection taking over the rank, which ends the old stream by design) fails the step under way and is
reopened by the attention side at the start of the next step, so a retried step goes through.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

import torch

from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.transport.auth import call_metadata
from expertmesh.transport.codec import from_proto, to_proto
from expertmesh.transport.errors import DataPlaneError, PeerFault
from expertmesh.transport.mailbox import Mailbox
from expertmesh.transport.settings import DataPlaneSettings

RANK_METADATA = "attention-rank"
# An attention actor waits for the router, which itself waits (with the same deadline) for the shards and
# for the other attention actors: its own deadline is only a backstop behind theirs.
ATTENTION_WAIT_FACTOR = 3


class Pending:
    """A routed output not yet back: `wait()` returns it, or raises the step's failure or a timeout."""

    def __init__(self, mailbox: Mailbox, key: tuple, what: str, timeout_s: float, peer: tuple[str, int]):
        self.mailbox, self.key, self.what, self.timeout_s, self.peer = mailbox, key, what, timeout_s, peer

    def wait(self) -> torch.Tensor:
        return self.mailbox.take(self.key, self.what, self.timeout_s, self.peer)


class GrpcRouterLink:
    """Attention side: one stream to the router, opened here and reopened when it breaks."""

    def __init__(self, address: str, rank: int, *, secret: str, settings: DataPlaneSettings):
        import grpc

        from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc

        self.address, self.rank, self._secret, self.settings = address, rank, secret, settings
        self.channel = grpc.insecure_channel(address, options=settings.channel_options())
        self._stub = pb_grpc.MoERouterStub(self.channel)
        self._mailbox = Mailbox()
        self._lock = threading.Lock()
        self._expected: dict[tuple, torch.Size] = {}  # shape of each output still awaited, by key
        self.reconnects = 0
        self._open()

    def _open(self) -> None:
        requests = queue.SimpleQueue()
        metadata = call_metadata(self._secret, (RANK_METADATA, str(self.rank)))
        call = self._stub.Route(iter(requests.get, None), metadata=metadata)
        self._requests, self._call, self._broken = requests, call, None
        threading.Thread(target=self._read, args=(call,), name=f"router-link-{self.rank}", daemon=True).start()

    def _read(self, call) -> None:
        import grpc

        try:
            for r in call:
                if r.error:
                    self._mailbox.fail(DataPlaneError(r.error), step=r.step)
                else:
                    self._deliver(r)
            error: Exception = DataPlaneError(f"the router at {self.address} closed the stream")
        except grpc.RpcError as e:
            error = DataPlaneError(f"router at {self.address}: {e.code().name}: {e.details()}")
        with self._lock:
            if call is not self._call:  # an old stream, already replaced: nothing waits on it
                return
            self._broken = error
        self._mailbox.fail(error)

    def _deliver(self, r: pb.RouteResponse) -> None:
        key = (r.step, r.micro_batch, r.layer)
        with self._lock:
            shape = self._expected.pop(key, None)
        if shape is None:
            return  # nobody asked for it (a step already given up): never fed to a later layer
        try:
            out = from_proto(r.output, name="routed output")
            if out.shape != shape:
                raise ValueError(f"routed output of layer {r.layer} is {list(out.shape)}, expected {list(shape)}")
        except ValueError as e:
            self._mailbox.fail_key(key, PeerFault(f"the router at {self.address}: {e}", "router", 0))
            return
        self._mailbox.put(key, out)

    def start_step(self, step: int) -> None:
        """Before a step sends anything: forgets older steps, and reopens the stream if it broke."""
        self._mailbox.drop_before(step)
        with self._lock:
            self._expected = {k: v for k, v in self._expected.items() if k[0] >= step}
            broken = self._broken is not None
        if broken:
            self._close_call()
            self._mailbox.reset_failure()
            self.reconnects += 1
            self._open()

    def submit(self, step: int, micro_batch: int, layer: int, hidden: torch.Tensor) -> Pending:
        if self._broken is not None:
            raise self._broken
        key = (step, micro_batch, layer)
        pending = Pending(self._mailbox, key, f"routed output of layer {layer} from the router at {self.address}",
                          self.settings.timeout_s * ATTENTION_WAIT_FACTOR, ("router", 0))
        with self._lock:
            self._expected[key] = hidden.shape
        self._mailbox.register(key)  # registered before the answer can arrive
        self._requests.put(pb.RouteRequest(step=step, micro_batch=micro_batch, layer=layer,
                                           hidden_states=to_proto(hidden)))
        return pending

    def fail(self, step: int, reason: str) -> None:
        self._mailbox.fail(DataPlaneError(reason), step=step)

    def _close_call(self) -> None:
        self._requests.put(None)
        self._call.cancel()

    def close(self) -> None:
        self._close_call()
        self.channel.close()


class _Refusal:
    def __init__(self, reason: str):
        self.reason = reason


class GrpcAttentionSide:
    """Router side: the `MoERouter` service the attention actors stream to. It takes streams only from the
    graph's own ranks, and messages only of the step under way or the next one."""

    def __init__(self, ranks: Iterable[int], *, dtype: torch.dtype, settings: DataPlaneSettings, first_step: int = 1):
        self.ranks, self.dtype, self.settings = frozenset(ranks), dtype, settings
        self._inbox = Mailbox()
        self._outboxes: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        # the step under way, or the last one started: an attention actor may send a step's first layer
        # before the router has started that step, so the next one is taken too
        self._step = first_step - 1

    def _outbox(self, rank: int) -> queue.SimpleQueue:
        with self._lock:
            return self._outboxes.setdefault(rank, queue.SimpleQueue())

    # the gRPC handler: one call per attention actor, for as long as its stream lives
    def Route(self, request_iterator, context):
        import grpc

        meta = dict(context.invocation_metadata())
        try:
            rank = int(meta[RANK_METADATA])
        except (KeyError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Route needs the {RANK_METADATA} metadata (an integer)")
            return
        if rank not in self.ranks:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{RANK_METADATA} {rank} is not an attention rank of this graph ({sorted(self.ranks)})")
            return
        outbox = queue.SimpleQueue()
        with self._lock:
            old = self._outboxes.get(rank)
            self._outboxes[rank] = outbox  # a reconnected or restarted attention actor takes over its rank
        if old is not None:
            # hand over what was queued before this stream opened (a step's failure, say), then end the old one
            while True:
                try:
                    item = old.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, pb.RouteResponse):
                    outbox.put(item)
            old.put(None)
        threading.Thread(target=self._read, args=(request_iterator, rank, outbox), name=f"route-in-{rank}",
                         daemon=True).start()
        while (item := outbox.get()) is not None:
            if isinstance(item, _Refusal):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, item.reason)
                return
            yield item

    def _read(self, request_iterator, rank: int, outbox: queue.SimpleQueue) -> None:
        import grpc

        try:
            for r in request_iterator:
                step = self._step
                if r.step < step:
                    continue  # a late message of a step already over
                if r.step > step + 1:
                    outbox.put(_Refusal(f"step {r.step} is neither the step under way ({step}) nor the next"))
                    return
                try:
                    hidden = from_proto(r.hidden_states, name="hidden_states")
                except ValueError as e:
                    outbox.put(pb.RouteResponse(step=r.step, error=str(e)))
                    continue
                self._inbox.put((r.step, r.micro_batch, r.layer, rank), hidden)
        except grpc.RpcError:
            pass  # the attention actor went away, or reconnected; the executor notices a failed step
        outbox.put(None)

    def receive(self, step: int, micro_batch: int, layer: int, rank: int, num_tokens: int, hidden_size: int):
        hidden = self._inbox.take((step, micro_batch, layer, rank), f"hidden states of layer {layer} from attention "
                                  f"actor {rank}", self.settings.timeout_s, ("attention", rank))
        if tuple(hidden.shape) != (num_tokens, hidden_size) or hidden.dtype != self.dtype:
            raise PeerFault(f"attention actor {rank} sent {hidden.dtype} hidden states {list(hidden.shape)} for layer "
                            f"{layer}, expected {self.dtype} [{num_tokens}, {hidden_size}]", "attention", rank)
        return hidden

    def reply(self, step: int, micro_batch: int, layer: int, rank: int, out: torch.Tensor) -> None:
        self._outbox(rank).put(pb.RouteResponse(step=step, micro_batch=micro_batch, layer=layer,
                                                output=to_proto(out)))

    def start_step(self, step: int) -> None:
        self._step = step
        self._inbox.drop_before(step)

    def finish_step(self) -> None:
        pass

    def fail(self, step: int, reason: str, ranks) -> None:
        self._inbox.fail(DataPlaneError(reason), step=step)
        for rank in ranks:
            self._outbox(rank).put(pb.RouteResponse(step=step, error=reason))


def start_router_server(side: GrpcAttentionSide, host: str, *, secret: str, port: int = 0):
    """Serves the router's side on host:port (0: a free port); returns (server, "host:port")."""
    from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc
    from expertmesh.transport.grpc_server import start_server

    return start_server(pb_grpc.add_MoERouterServicer_to_server, side, host, secret=secret, settings=side.settings,
                        what="moe-router", port=port)
