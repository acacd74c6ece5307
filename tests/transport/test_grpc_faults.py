"""The gRPC data plane under faults and strangers, on 127.0.0.1: calls without the graph's token refused before
any state is touched, ranks and steps outside the graph's refused, a shard that stalls or answers out of step
named within the deadline (and its late answer never read as the next one), a Route stream taken over by a
second connection reopened at the next step, messages above the cap and streams beyond the bound refused."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc
from expertmesh.transport import DataPlaneError, DataPlaneSettings, PeerFault, ShardWork
from expertmesh.transport.auth import call_metadata
from expertmesh.transport.codec import to_proto
from expertmesh.transport.grpc_dispatch import GrpcDispatch, start_shard_server
from expertmesh.transport.grpc_route import GrpcAttentionSide, GrpcRouterLink, start_router_server
from expertmesh.transport.grpc_server import start_server

HIDDEN = 16
SECRET = "the-graph-secret"
FAST = DataPlaneSettings(timeout_s=1.0)


class ScaleRuntime:
    """A shard runtime whose 'experts' scale the hidden states by the layer number; it can be made to stall
    once, and it counts the requests it served."""

    shard_index, hidden_size, dtype = 0, HIDDEN, torch.float32

    def __init__(self):
        self.served = 0
        self.stall_s = 0.0
        self.last_compute_s = 0.0

    def serve(self, layer, hidden, expert_ids, weights, version, slots=None):
        self.served += 1
        if self.stall_s:
            stall, self.stall_s = self.stall_s, 0.0
            time.sleep(stall)
        return hidden * layer


def work(num_tokens: int = 3, seed: int = 0) -> ShardWork:
    gen = torch.Generator().manual_seed(seed)
    return ShardWork(shard=0, tokens=torch.arange(num_tokens),
                     hidden_states=torch.randn(num_tokens, HIDDEN, generator=gen),
                     expert_ids=torch.zeros(num_tokens, 1, dtype=torch.int64), weights=torch.ones(num_tokens, 1))


def request(step: int = 1, layer: int = 2, version: int = 0) -> pb.ExpertRequest:
    w = work()
    return pb.ExpertRequest(step=step, layer=layer, placement_version=version, hidden_states=to_proto(w.hidden_states),
                            expert_ids=to_proto(w.expert_ids), weights=to_proto(w.weights))


@pytest.fixture
def shard():
    runtime = ScaleRuntime()
    server, address = start_shard_server(runtime, "127.0.0.1", secret=SECRET, settings=FAST)
    yield runtime, address
    server.stop(None)


@pytest.fixture
def router():
    side = GrpcAttentionSide([0, 1], dtype=torch.float32, settings=FAST)
    server, address = start_router_server(side, "127.0.0.1", secret=SECRET)
    yield side, address
    server.stop(None)


def call_status(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


# -- strangers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [(), (("x-expertmesh-graph-token", "guess"),)], ids=["no-token", "wrong-token"])
def test_a_stranger_gets_unauthenticated_and_touches_no_state(shard, router, metadata):
    runtime, shard_address = shard
    side, router_address = router
    with grpc.insecure_channel(shard_address) as channel:
        responses = pb_grpc.ExpertShardStub(channel).Dispatch(iter([request()]), metadata=metadata, timeout=10)
        code, details = call_status(lambda: next(responses))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "only its own graph" in details
    assert runtime.served == 0  # the shard computed nothing for it
    with grpc.insecure_channel(router_address) as channel:
        claim = pb.RouteRequest(step=1, micro_batch=0, layer=1, hidden_states=to_proto(torch.zeros(2, HIDDEN)))
        responses = pb_grpc.MoERouterStub(channel).Route(iter([claim]), metadata=(*metadata, ("attention-rank", "0")),
                                                         timeout=10)
        code, _ = call_status(lambda: next(responses))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert side._outboxes == {}  # nobody took over rank 0


def test_a_rank_outside_the_graph_is_refused(router):
    _, address = router
    with grpc.insecure_channel(address) as channel:
        responses = pb_grpc.MoERouterStub(channel).Route(
            iter([]), metadata=call_metadata(SECRET, ("attention-rank", "7")), timeout=10)
        code, details = call_status(lambda: next(responses))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "attention-rank 7 is not an attention rank" in details


def test_only_the_step_under_way_and_the_next_are_taken(router):
    side, address = router
    side.start_step(5)
    link = GrpcRouterLink(address, 0, secret=SECRET, settings=FAST)
    try:
        x = torch.randn(2, HIDDEN)
        link.submit(4, 0, 1, x)  # a late message of a step already over: dropped
        link.submit(6, 0, 1, x)  # the next step: taken
        assert torch.equal(side.receive(6, 0, 1, 0, 2, HIDDEN), x)
        with pytest.raises(PeerFault, match="no hidden states of layer 1 from attention actor 0 within 1 s"):
            side.receive(4, 0, 1, 0, 2, HIDDEN)
        pending = link.submit(9, 0, 1, x)  # far ahead: the stream is ended, never stored
        with pytest.raises(DataPlaneError, match="INVALID_ARGUMENT: step 9 is neither the step under way"):
            pending.wait()
        assert len(side._inbox) == 0  # nothing of step 9 kept
    finally:
        link.close()


# -- a shard that stalls or answers out of step ----------------------------------------------------------------


def test_a_stalled_shard_is_named_within_the_deadline_and_its_late_answer_is_never_read(shard):
    runtime, address = shard
    dispatch = GrpcDispatch({0: address}, secret=SECRET, settings=FAST)
    try:
        runtime.stall_s = 3.0
        start = time.monotonic()
        with pytest.raises(PeerFault, match=r"expert shard 0 at .* did not answer within 1 s") as info:
            dispatch.dispatch(1, 2, 0, [work(seed=1)])
        assert time.monotonic() - start < 2.5 and (info.value.role, info.value.index) == ("shard", 0)
        fresh = work(seed=2)
        (out,) = dispatch.dispatch(2, 3, 0, [fresh])  # a new stream: step 1's answer cannot come back as this
        assert torch.equal(out, fresh.hidden_states * 3)
    finally:
        dispatch.close()


class LyingShard(pb_grpc.ExpertShardServicer):  # the rpcs it does not lie on: UNIMPLEMENTED
    """A shard servicer that answers each request with something else: another step, another layer, or
    another shape."""

    def __init__(self, lie: str):
        self.lie = lie

    def Dispatch(self, request_iterator, context):
        for r in request_iterator:
            step, layer, rows = r.step, r.layer, r.hidden_states.shape[0]
            if self.lie == "step":
                step -= 1
            elif self.lie == "layer":
                layer += 1
            else:
                rows += 1
            yield pb.ExpertResponse(step=step, layer=layer, output=to_proto(torch.zeros(rows, HIDDEN)))


@pytest.mark.parametrize("lie,needle", [
    ("step", "answered step 6 layer 2 to the request for step 7 layer 2"),
    ("layer", "answered step 7 layer 3 to the request for step 7 layer 2"),
    ("shape", r"answered layer 2 with torch.float32 \[4, 16\], expected torch.float32 \[3, 16\]"),
])
def test_an_answer_that_does_not_fit_its_request_fails_the_dispatch(lie, needle):
    server, address = start_server(pb_grpc.add_ExpertShardServicer_to_server, LyingShard(lie), "127.0.0.1",
                                   secret=SECRET, settings=FAST, what="lying-shard")
    dispatch = GrpcDispatch({0: address}, secret=SECRET, settings=FAST)
    try:
        with pytest.raises(PeerFault, match=needle):
            dispatch.dispatch(7, 2, 0, [work()])
    finally:
        dispatch.close()
        server.stop(None)


# -- a Route stream taken over, caps and bounds -----------------------------------------------------------------


def test_a_route_stream_taken_over_fails_its_step_and_reopens_at_the_next(router):
    side, address = router
    link = GrpcRouterLink(address, 0, secret=SECRET, settings=FAST)
    intruder = None
    try:
        side.start_step(1)
        pending = link.submit(1, 0, 1, torch.randn(2, HIDDEN))
        side.receive(1, 0, 1, 0, 2, HIDDEN)
        # a second connection for rank 0 (with the token: a restarted actor, say) ends the first stream
        intruder = grpc.insecure_channel(address)
        stream = pb_grpc.MoERouterStub(intruder).Route(iter(threading.Event().wait, True),
                                                       metadata=call_metadata(SECRET, ("attention-rank", "0")))
        with pytest.raises(DataPlaneError, match="closed the stream"):
            pending.wait()
        link.start_step(2)  # the next step reopens the link's stream, which takes rank 0 back
        assert link.reconnects == 1
        side.start_step(2)
        x = torch.randn(3, HIDDEN)
        pending = link.submit(2, 0, 1, x)
        assert torch.equal(side.receive(2, 0, 1, 0, 3, HIDDEN), x)
        side.reply(2, 0, 1, 0, x * 2)
        assert torch.equal(pending.wait(), x * 2)
        stream.cancel()
    finally:
        link.close()
        if intruder is not None:
            intruder.close()


def test_messages_above_the_cap_are_refused(shard):
    _, address = shard
    small = DataPlaneSettings(timeout_s=5.0, max_message_bytes=64 * 1024)
    dispatch = GrpcDispatch({0: address}, secret=SECRET, settings=small)
    try:
        with pytest.raises(DataPlaneError, match="RESOURCE_EXHAUSTED"):
            dispatch.dispatch(1, 2, 0, [work(num_tokens=2048)])  # 128 KiB of hidden states
    finally:
        dispatch.close()


def test_streams_beyond_the_bound_are_refused():
    settings = DataPlaneSettings(timeout_s=5.0, max_concurrent_rpcs=2)
    server, address = start_shard_server(ScaleRuntime(), "127.0.0.1", secret=SECRET, settings=settings)
    channels = [grpc.insecure_channel(address) for _ in range(3)]
    try:
        held = []
        for channel in channels[:2]:  # two long-lived streams, each answered once, then left open
            requests = iter([request()] + [None])
            stream = pb_grpc.ExpertShardStub(channel).Dispatch(
                (r for r in requests if r is not None or threading.Event().wait(30)), metadata=call_metadata(SECRET))
            assert next(stream).step == 1
            held.append(stream)
        third = pb_grpc.ExpertShardStub(channels[2]).Dispatch(iter([request()]), metadata=call_metadata(SECRET),
                                                               timeout=10)
        code, _ = call_status(lambda: next(third))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in held:
            stream.cancel()
    finally:
        for channel in channels:
            channel.close()
        server.stop(None)
