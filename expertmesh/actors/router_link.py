"""The data plane between the attention actors and the router, per MoE layer of each micro-batch.

An attention actor `submit`s a micro-batch's normalized hidden states for a layer and gets back a pending
result it waits on after computing its shared experts. The router `receive`s each attention actor's part,
runs the layer's routed experts over all of them at once, and `reply`s. Two transports:
- gRPC: one persistent `MoERouter.Route` stream per attention actor (used by the "grpc" and "inprocess"
  deployments: in the latter only the shards live in the router's process);
- torch.distributed point-to-point messages, tagged by (layer, micro-batch), for "collective".
A failed step is reported to every waiter (`fail`), so no attention actor hangs on a router that gave up.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import torch

from expertmesh.actors.dispatch import DataPlaneError, tag
from expertmesh.actors.expert_shard import _GRPC_OPTIONS
from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.protos.tensor_codec import from_proto, to_proto

# The longest a data-plane wait lasts before it gives up: a backstop only, since the executor aborts a
# failed step's waiters as soon as it sees the failure.
WAIT_TIMEOUT_S = 300.0


class Mailbox:
    """Futures by key, created by whichever side comes first: the waiter or the message."""

    def __init__(self):
        self._lock = threading.Lock()
        self._futures: dict[tuple, Future] = {}
        self._failed: dict[int | None, Exception] = {}  # failed steps (None: every step), by step

    def register(self, key: tuple) -> Future:
        """The future of `key`, created if new (already failed if its step has failed)."""
        with self._lock:
            fut = self._futures.get(key)
            if fut is None:
                fut = self._futures[key] = Future()
                error = self._failed.get(key[0], self._failed.get(None))
                if error is not None:  # a key first used after its step failed fails at once
                    fut.set_exception(error)
            return fut

    def put(self, key: tuple, value) -> None:
        fut = self.register(key)
        if not fut.done():
            fut.set_result(value)

    def take(self, key: tuple, what: str):
        fut = self.register(key)
        try:
            return fut.result(timeout=WAIT_TIMEOUT_S)
        except TimeoutError:
            raise DataPlaneError(f"no {what} within {WAIT_TIMEOUT_S:.0f} s") from None
        finally:
            with self._lock:
                self._futures.pop(key, None)

    def fail(self, error: Exception, step: int | None = None) -> None:
        """Fails every waiter (of one step, when given); later messages of that step are dropped. The failed
        futures stay until taken, so a wait that starts after the failure raises it rather than hanging."""
        with self._lock:
            self._failed[step] = error
            for key, fut in self._futures.items():
                if (step is None or key[0] == step) and not fut.done():
                    fut.set_exception(error)

    def drop_before(self, step: int) -> None:
        with self._lock:
            for key in [k for k in self._futures if k[0] < step]:
                del self._futures[key]
            for old in [s for s in self._failed if s is not None and s < step]:
                del self._failed[old]


class _Pending:
    def __init__(self, mailbox: Mailbox, key: tuple, what: str):
        self.mailbox, self.key, self.what = mailbox, key, what

    def wait(self) -> torch.Tensor:
        return self.mailbox.take(self.key, self.what)


# -- gRPC ------------------------------------------------------------------------------------------------


class GrpcRouterLink:
    """Attention side: one stream to the router, opened here and kept."""

    def __init__(self, address: str, rank: int):
        import grpc

        from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc

        self.address, self.rank = address, rank
        self.channel = grpc.insecure_channel(address, options=_GRPC_OPTIONS)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        stub = pb_grpc.MoERouterStub(self.channel)
        self._responses = stub.Route(iter(self._requests.get, None), metadata=(("attention-rank", str(rank)),))
        self._mailbox = Mailbox()
        self._broken: Exception | None = None
        self._reader = threading.Thread(target=self._read, name=f"router-link-{rank}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        import grpc

        try:
            for r in self._responses:
                if r.error:
                    self._mailbox.fail(DataPlaneError(r.error), step=r.step)
                else:
                    self._mailbox.put((r.step, r.micro_batch, r.layer), from_proto(r.output, name="routed output"))
            error: Exception = DataPlaneError(f"the router at {self.address} closed the stream")
        except grpc.RpcError as e:
            error = DataPlaneError(f"router at {self.address}: {e.code().name}: {e.details()}")
        self._broken = error
        self._mailbox.fail(error)

    def submit(self, step: int, micro_batch: int, layer: int, hidden: torch.Tensor) -> _Pending:
        if self._broken is not None:
            raise self._broken
        key = (step, micro_batch, layer)
        pending = _Pending(self._mailbox, key, f"routed output of layer {layer} from the router at {self.address}")
        self._mailbox.register(key)  # registered before the answer can arrive
        self._requests.put(pb.RouteRequest(step=step, micro_batch=micro_batch, layer=layer,
                                           hidden_states=to_proto(hidden)))
        return pending

    def fail(self, step: int, reason: str) -> None:
        self._mailbox.fail(DataPlaneError(reason), step=step)

    def start_step(self, step: int) -> None:
        self._mailbox.drop_before(step)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()
        self.channel.close()


class GrpcAttentionSide:
    """Router side: the `MoERouter` service the attention actors stream to."""

    def __init__(self):
        self._inbox = Mailbox()
        self._outboxes: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()

    def _outbox(self, rank: int) -> queue.SimpleQueue:
        with self._lock:
            return self._outboxes.setdefault(rank, queue.SimpleQueue())

    # the gRPC handler: one call per attention actor, for the deployment's lifetime
    def Route(self, request_iterator, context):
        import grpc

        meta = dict(context.invocation_metadata())
        try:
            rank = int(meta["attention-rank"])
        except (KeyError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Route needs the attention-rank metadata (an integer)")
            return
        outbox = queue.SimpleQueue()
        with self._lock:
            old = self._outboxes.get(rank)
            self._outboxes[rank] = outbox  # a restarted attention actor takes over its rank
        if old is not None:
            # hand over what was queued before this stream opened (a step's failure, say), then end the old one
            while True:
                try:
                    item = old.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    outbox.put(item)
            old.put(None)

        def read() -> None:
            try:
                for r in request_iterator:
                    try:
                        hidden = from_proto(r.hidden_states, name="hidden_states")
                    except ValueError as e:
                        outbox.put(pb.RouteResponse(step=r.step, error=str(e)))
                        continue
                    self._inbox.put((r.step, r.micro_batch, r.layer, rank), hidden)
            except grpc.RpcError:
                pass  # the attention actor went away; the executor notices
            outbox.put(None)

        threading.Thread(target=read, name=f"route-in-{rank}", daemon=True).start()
        while (item := outbox.get()) is not None:
            yield item

    def receive(self, step: int, micro_batch: int, layer: int, rank: int, num_tokens: int, hidden_size: int):
        hidden = self._inbox.take((step, micro_batch, layer, rank), f"hidden states of layer {layer} from "
                                  f"attention actor {rank}")
        if tuple(hidden.shape) != (num_tokens, hidden_size):
            raise DataPlaneError(f"attention actor {rank} sent hidden states {list(hidden.shape)} for layer {layer}, "
                                 f"expected [{num_tokens}, {hidden_size}]")
        return hidden

    def reply(self, step: int, micro_batch: int, layer: int, rank: int, out: torch.Tensor) -> None:
        self._outbox(rank).put(pb.RouteResponse(step=step, micro_batch=micro_batch, layer=layer,
                                                output=to_proto(out)))

    def start_step(self, step: int) -> None:
        self._inbox.drop_before(step)

    def finish_step(self) -> None:
        pass

    def fail(self, step: int, reason: str, ranks) -> None:
        self._inbox.fail(DataPlaneError(reason), step=step)
        for rank in ranks:
            self._outbox(rank).put(pb.RouteResponse(step=step, error=reason))


def start_router_server(side: GrpcAttentionSide, host: str, port: int = 0):
    from concurrent import futures

    import grpc

    from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=_GRPC_OPTIONS)
    pb_grpc.add_MoERouterServicer_to_server(side, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"the router could not bind a gRPC port on {host}:{port}")
    server.start()
    return server, f"{host}:{bound}"


# -- torch.distributed -----------------------------------------------------------------------------------


class _CollectivePending:
    def __init__(self, send_handle, out: torch.Tensor, src: int, tag_: int):
        self.send_handle, self.out, self.src, self.tag = send_handle, out, src, tag_

    def wait(self) -> torch.Tensor:
        import torch.distributed as dist

        dist.recv(self.out, self.src, tag=self.tag)
        self.send_handle.wait()
        return self.out


class CollectiveRouterLink:
    """Attention side over torch.distributed; the router is `router_rank` in the group."""

    def __init__(self, router_rank: int = 0):
        self.router_rank = router_rank

    def submit(self, step: int, micro_batch: int, layer: int, hidden: torch.Tensor) -> _CollectivePending:
        import torch.distributed as dist

        hidden = hidden.contiguous()
        handle = dist.isend(hidden, self.router_rank, tag=tag(layer, micro_batch, "attn_hidden"))
        return _CollectivePending(handle, torch.empty_like(hidden), self.router_rank,
                                  tag(layer, micro_batch, "attn_out"))

    def fail(self, step: int, reason: str) -> None:
        pass  # a blocked receive cannot be interrupted: the executor restarts a failed collective graph

    def start_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class CollectiveAttentionSide:
    """Router side over torch.distributed; `ranks[r]` is attention actor r's rank in the group."""

    def __init__(self, ranks, dtype: torch.dtype):
        self.ranks, self.dtype = list(ranks), dtype
        self._sends: list = []

    def receive(self, step, micro_batch, layer, rank, num_tokens, hidden_size):
        import torch.distributed as dist

        hidden = torch.empty(num_tokens, hidden_size, dtype=self.dtype)
        dist.recv(hidden, self.ranks[rank], tag=tag(layer, micro_batch, "attn_hidden"))
        return hidden

    def reply(self, step, micro_batch, layer, rank, out):
        import torch.distributed as dist

        out = out.contiguous()  # kept alive, with its handle, until the send completes
        self._sends.append((dist.isend(out, self.ranks[rank], tag=tag(layer, micro_batch, "attn_out")), out))

    def start_step(self, step: int) -> None:
        self._sends = []

    def finish_step(self) -> None:
        for handle, _ in self._sends:
            handle.wait()
        self._sends = []

    def fail(self, step, reason, ranks) -> None:
        pass
