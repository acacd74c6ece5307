"""The gRPC data plane on 127.0.0.1: router -> expert shard (`ExpertShard.Dispatch`, one persistent stream per
shard, bad requests refused with INVALID_ARGUMENT and a reason) and attention actor <-> router (`MoERouter.Route`,
the `GrpcRouterLink` / `GrpcAttentionSide` pair). Faults and strangers are in test_grpc_faults.py."""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest
import torch

from expertmesh.actors.expert_shard import ExpertShard
from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc
from expertmesh.transport import DataPlaneError, DataPlaneSettings, PeerFault, ShardWork
from expertmesh.transport.auth import call_metadata
from expertmesh.transport.codec import to_proto
from expertmesh.transport.grpc_dispatch import GrpcDispatch, start_shard_server
from expertmesh.transport.grpc_route import GrpcAttentionSide, GrpcRouterLink, start_router_server
from expertmesh.transport.mailbox import Mailbox

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

HIDDEN, TOP_K = 128, 4  # the tiny preset
VERSION = 5
SHARD_EXPERTS = [[(1, 0), (1, 3), (1, 5), (2, 1)], [(1, 7), (1, 9)]]
SECRET = "test-graph-secret"
# a wait that never gets its message fails a test in seconds
SETTINGS = DataPlaneSettings(timeout_s=10.0)


@pytest.fixture(scope="module")
def shards(tiny_model_dir):
    return [ExpertShard(tiny_model_dir, experts, shard_index=i, placement_version=VERSION)
            for i, experts in enumerate(SHARD_EXPERTS)]


@pytest.fixture(scope="module")
def addresses(shards, request):
    out = []
    for shard in shards:
        server, address = start_shard_server(shard, "127.0.0.1", secret=SECRET, settings=SETTINGS)
        request.addfinalizer(lambda server=server: server.stop(None))
        out.append(address)
    return out


@pytest.fixture
def dispatch(addresses):
    d = GrpcDispatch(dict(enumerate(addresses)), secret=SECRET, settings=SETTINGS)
    yield d
    d.close()


def make_work(shard: int, ids: list[int], num_tokens: int = 5, seed: int = 0, dtype=torch.float32) -> ShardWork:
    gen = torch.Generator().manual_seed(seed)
    expert_ids = torch.tensor([ids + [-1] * (TOP_K - len(ids))] * num_tokens)
    weights = torch.where(expert_ids >= 0, torch.rand(num_tokens, TOP_K, generator=gen) + 0.1, 0.0)
    return ShardWork(shard=shard, tokens=torch.arange(num_tokens),
                     hidden_states=torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype),
                     expert_ids=expert_ids, weights=weights)


def forward(shards, layer, work: ShardWork) -> torch.Tensor:
    return shards[work.shard].forward(layer, work.hidden_states, work.expert_ids, work.weights)


# -- router -> expert shard ----------------------------------------------------------------------------------


def test_round_trip_equals_forward_over_one_persistent_stream(shards, dispatch):
    stream = dispatch.streams[0]
    for step, (ids, tokens) in enumerate([([0, 3], 5), ([5], 1), ([0, 3, 5], 17)], start=1):
        work = make_work(0, ids, tokens, seed=step)
        (out,) = dispatch.dispatch(step, 1, VERSION, [work])
        assert torch.equal(out, forward(shards, 1, work))
        assert dispatch.last_compute_s > 0  # the shard reports its time on the experts
        if step == 1:
            call = stream._call
        assert stream._call is call, "each dispatch must reuse the stream opened by the first"


def test_round_trip_to_two_shards(shards, dispatch):
    works = [make_work(0, [0, 5], 4, seed=1), make_work(1, [7, 9], 6, seed=2)]
    outs = dispatch.dispatch(1, 1, VERSION, works)
    assert [tuple(o.shape) for o in outs] == [(4, HIDDEN), (6, HIDDEN)]
    for work, out in zip(works, outs):
        assert torch.equal(out, forward(shards, 1, work))
    # another layer, other shard only
    work = make_work(0, [1], 3, seed=3)
    assert torch.equal(dispatch.dispatch(2, 2, VERSION, [work])[0], forward(shards, 2, work))


def _request(layer=1, version=VERSION, hidden=None, ids=(0, 3), weights=None) -> pb.ExpertRequest:
    work = make_work(0, list(ids), 3)
    hidden = to_proto(work.hidden_states) if hidden is None else hidden
    weights = to_proto(work.weights) if weights is None else weights
    return pb.ExpertRequest(step=9, layer=layer, placement_version=version, hidden_states=hidden,
                            expert_ids=to_proto(work.expert_ids), weights=weights)


def _short_tensor() -> pb.Tensor:
    good = to_proto(torch.randn(3, HIDDEN))
    return pb.Tensor(dtype="float32", shape=[3, HIDDEN], data=good.data[:-4])


MALFORMED = {
    "hidden-size": (lambda: _request(hidden=to_proto(torch.randn(3, 64))), [r"\[T, 128\]", r"\[3, 64\]"]),
    "dtype": (lambda: _request(hidden=to_proto(torch.randn(3, HIDDEN, dtype=torch.bfloat16))),
              [r"torch.float32", r"torch.bfloat16"]),
    "layer-not-held": (lambda: _request(layer=3), [r"holds no experts of layer 3"]),
    "expert-not-held": (lambda: _request(ids=(0, 11)), [r"does not hold experts \[11\] of layer 1"]),
    "version": (lambda: _request(version=VERSION + 1), [rf"placement version {VERSION}", rf"version {VERSION + 1}"]),
    "byte-count": (lambda: _request(hidden=_short_tensor()),
                   [r"hidden_states carries 1532 bytes", r"float32 \[3, 128\] needs 1536"]),
    "unknown-dtype": (lambda: _request(weights=pb.Tensor(dtype="float8", shape=[3, 4], data=b"\0" * 12)),
                      [r"weights has unknown dtype 'float8'"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_ends_the_stream_with_invalid_argument(addresses, case):
    make_request, patterns = MALFORMED[case]
    with grpc.insecure_channel(addresses[0]) as channel:
        stub = pb_grpc.ExpertShardStub(channel)
        # a good request is answered first; the bad one after it ends the stream
        responses = stub.Dispatch(iter([_request(), make_request(), _request()]), timeout=30,
                                  metadata=call_metadata(SECRET))
        first = next(responses)
        assert first.step == 9 and first.layer == 1 and list(first.output.shape) == [3, HIDDEN]
        with pytest.raises(grpc.RpcError) as info:
            next(responses)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for pattern in patterns:
        assert re.search(pattern, info.value.details()), f"{pattern!r} not in {info.value.details()!r}"


def test_refusal_surfaces_as_data_plane_error_and_the_stream_reopens(shards, dispatch, addresses):
    good = make_work(0, [0, 3], 4, seed=1)
    dispatch.dispatch(1, 1, VERSION, [good])
    with pytest.raises(DataPlaneError) as info:
        dispatch.dispatch(2, 1, VERSION, [make_work(0, [0, 11], 4)])
    message = str(info.value)
    assert f"expert shard 0 at {addresses[0]}" in message
    assert "INVALID_ARGUMENT" in message and "does not hold experts [11] of layer 1" in message
    # the next dispatch on the same GrpcDispatch opens a new stream and succeeds
    (out,) = dispatch.dispatch(3, 1, VERSION, [good])
    assert torch.equal(out, forward(shards, 1, good))

    with pytest.raises(DataPlaneError, match=rf"expert shard 0 .*placement version {VERSION}.*version {VERSION + 1}"):
        dispatch.dispatch(4, 1, VERSION + 1, [good])
    assert torch.equal(dispatch.dispatch(5, 1, VERSION, [good])[0], forward(shards, 1, good))


def test_one_shard_refusing_leaves_the_other_streams_in_step(shards, dispatch, addresses):
    good0, good1 = make_work(0, [0], 3, seed=4), make_work(1, [9], 2, seed=5)
    with pytest.raises(DataPlaneError, match=rf"expert shard 1 at {addresses[1]}: INVALID_ARGUMENT: .*\[3\]"):
        dispatch.dispatch(1, 1, VERSION, [good0, make_work(1, [3], 2)])
    for step in (2, 3):  # shard 0's answer to the failed step was read, so it does not answer this one
        out0, out1 = dispatch.dispatch(step, 1, VERSION, [make_work(0, [3, 5], 6, seed=step), good1])
        assert torch.equal(out0, forward(shards, 1, make_work(0, [3, 5], 6, seed=step)))
        assert torch.equal(out1, forward(shards, 1, good1))


# -- attention actor <-> router ------------------------------------------------------------------------------


@pytest.fixture
def router():
    side = GrpcAttentionSide(range(3), dtype=torch.float32, settings=SETTINGS)
    server, address = start_router_server(side, "127.0.0.1", secret=SECRET)
    links: list[GrpcRouterLink] = []

    def connect(rank: int) -> GrpcRouterLink:
        links.append(GrpcRouterLink(address, rank=rank, secret=SECRET, settings=SETTINGS))
        return links[-1]

    yield side, connect, address
    for link in links:
        link.close()
    server.stop(None)


def test_link_round_trip(router):
    side, connect, _ = router
    link = connect(0)
    x = torch.randn(6, HIDDEN)
    pending = link.submit(1, 0, 1, x)
    got = side.receive(1, 0, 1, 0, 6, HIDDEN)
    assert torch.equal(got, x)
    reply = torch.randn(6, HIDDEN)
    side.reply(1, 0, 1, 0, reply)
    assert torch.equal(pending.wait(), reply)
    # the same stream carries the next layer and micro-batch, in any order of replies
    p_mb0, p_mb1 = link.submit(1, 0, 2, x[:2]), link.submit(1, 1, 2, x[2:])
    assert torch.equal(side.receive(1, 1, 2, 0, 4, HIDDEN), x[2:])
    assert torch.equal(side.receive(1, 0, 2, 0, 2, HIDDEN), x[:2])
    side.reply(1, 1, 2, 0, reply[2:])
    side.reply(1, 0, 2, 0, reply[:2])
    assert torch.equal(p_mb0.wait(), reply[:2]) and torch.equal(p_mb1.wait(), reply[2:])


def test_replies_go_to_the_rank_that_sent(router):
    side, connect, _ = router
    links = [connect(0), connect(1)]
    xs = [torch.randn(3, HIDDEN), torch.randn(5, HIDDEN)]
    pendings = [link.submit(1, 0, 1, x) for link, x in zip(links, xs)]
    for rank, x in enumerate(xs):
        assert torch.equal(side.receive(1, 0, 1, rank, x.shape[0], HIDDEN), x)
    for rank, x in enumerate(xs):
        side.reply(1, 0, 1, rank, x * (rank + 2))
    for rank, (pending, x) in enumerate(zip(pendings, xs)):
        assert torch.equal(pending.wait(), x * (rank + 2))


def test_fail_raises_in_a_waiting_wait(router):
    side, connect, _ = router
    link = connect(0)
    side.start_step(2)  # the router takes messages of the step under way (and the next) only
    pending = link.submit(2, 0, 1, torch.randn(4, HIDDEN))
    side.receive(2, 0, 1, 0, 4, HIDDEN)
    caught: list[Exception] = []

    def wait() -> None:
        try:
            pending.wait()
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            caught.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)  # usually already waiting; the result is the same either way
    side.fail(2, "expert shard 1 died", [0])
    waiter.join(15)
    assert not waiter.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], DataPlaneError)
    assert "expert shard 1 died" in str(caught[0])


def test_fail_before_the_wait_starts_still_raises_it(router):
    """The attention actor waits only after its shared experts: a failure reported meanwhile must not be lost
    (the wait would otherwise sit out the whole timeout and report a timeout instead of the reason)."""
    side, connect, _ = router
    link = connect(0)
    side.start_step(3)
    pending = link.submit(3, 1, 2, torch.randn(4, HIDDEN))
    side.receive(3, 1, 2, 0, 4, HIDDEN)  # the router has this rank's stream (a fail before it opens is not sent)
    side.fail(3, "router gave up on step 3", [0])
    time.sleep(0.5)  # the error has reached the link before anyone waits
    start = time.monotonic()
    with pytest.raises(DataPlaneError, match="router gave up on step 3"):
        pending.wait()
    assert time.monotonic() - start < 5


def test_fail_reported_before_the_stream_opens_is_delivered(router):
    """A failure the router reports for a rank whose stream is not open yet reaches that rank once it
    connects (it is not dropped when the stream takes over the rank)."""
    side, connect, _ = router
    side.start_step(6)
    side.fail(6, "router gave up on step 6", [2])
    link = connect(2)
    pending = link.submit(6, 0, 1, torch.randn(3, HIDDEN))
    start = time.monotonic()
    with pytest.raises(DataPlaneError, match="router gave up on step 6"):
        pending.wait()
    assert time.monotonic() - start < 5


def test_fail_leaves_other_steps_alone(router):
    side, connect, _ = router
    link = connect(0)
    x = torch.randn(2, HIDDEN)
    side.start_step(4)
    p4, p5 = link.submit(4, 0, 1, x), link.submit(5, 0, 1, x)
    side.receive(4, 0, 1, 0, 2, HIDDEN)
    side.receive(5, 0, 1, 0, 2, HIDDEN)
    side.fail(4, "step 4 failed", [0])
    side.reply(5, 0, 1, 0, x + 1)
    assert torch.equal(p5.wait(), x + 1)
    with pytest.raises(DataPlaneError, match="step 4 failed"):
        p4.wait()


def test_attention_side_fail_raises_in_the_routers_receive(router):
    side, _, _ = router
    caught: list[Exception] = []

    def receive() -> None:
        try:
            side.receive(6, 0, 1, 0, 2, HIDDEN)
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            caught.append(e)

    receiver = threading.Thread(target=receive)
    receiver.start()
    time.sleep(0.2)
    side.fail(6, "attention micro-batch 0 failed", [])
    receiver.join(15)
    assert not receiver.is_alive()
    assert len(caught) == 1 and "attention micro-batch 0 failed" in str(caught[0])


def test_receive_with_the_wrong_shape_is_refused(router):
    side, connect, _ = router
    link = connect(0)
    link.submit(1, 0, 1, torch.randn(6, HIDDEN))
    with pytest.raises(DataPlaneError, match=r"attention actor 0 sent torch.float32 hidden states \[6, 128\] for "
                                             r"layer 1, expected torch.float32 \[5, 128\]"):
        side.receive(1, 0, 1, 0, 5, HIDDEN)
    link.submit(1, 0, 2, torch.randn(6, HIDDEN))
    with pytest.raises(DataPlaneError, match=r"expected torch.float32 \[6, 64\]"):
        side.receive(1, 0, 2, 0, 6, 64)


def test_route_without_a_rank_is_refused(router):
    _, _, address = router
    with grpc.insecure_channel(address) as channel:
        responses = pb_grpc.MoERouterStub(channel).Route(iter([]), timeout=30, metadata=call_metadata(SECRET))
        with pytest.raises(grpc.RpcError) as info:
            next(responses)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "attention-rank" in info.value.details()


# -- the mailbox under both links ----------------------------------------------------------------------------


def test_mailbox_either_side_first_and_failures_kept_for_late_waiters():
    box = Mailbox()
    peer = ("router", 0)
    box.put((1, 0, 1), "early")  # the message before the waiter
    assert box.take((1, 0, 1), "x", 5, peer) == "early"
    box.register((1, 0, 2))  # a waiter registered, then its step fails
    box.fail(DataPlaneError("step 1 failed"), step=1)
    box.put((1, 0, 2), "late")  # a late message of the failed step is dropped
    with pytest.raises(DataPlaneError, match="step 1 failed"):
        box.take((1, 0, 2), "x", 5, peer)
    box.put((2, 0, 1), "other step")
    box.fail(DataPlaneError("step 1 failed again"), step=1)
    assert box.take((2, 0, 1), "x", 5, peer) == "other step"
    assert len(box) == 0  # every key taken is forgotten


def test_mailbox_wait_has_a_deadline_that_names_the_peer():
    start = time.monotonic()
    with pytest.raises(PeerFault, match=r"no hidden states within 0.2 s") as info:
        Mailbox().take((1, 0, 1), "hidden states", 0.2, ("attention", 3))
    assert (info.value.role, info.value.index) == ("attention", 3) and time.monotonic() - start < 5
