"""The data plane under faults, on a real 3-node cluster (every node at 127.0.0.1), in the middle of a generation:
a Route stream taken over by a second connection, a Dispatch stream closed by the shard, a shard that answers
Ray's pings but stalls in Dispatch, a shard that answers out of step, strangers knocking on every data-plane
port, and a replacement that cannot be placed. Every request finishes with local mode's tokens, except in the
last case, where the step's requests fail with 503 and the server goes on."""

from __future__ import annotations

import sys
import threading
import time

import grpc
import httpx2 as httpx
import pytest
import ray
import torch
from ray import cloudpickle

from expertmesh import LLM, SamplingParams
from expertmesh.actors import ExpertShardActor
from expertmesh.actors._process import node_info
from expertmesh.graph import ActorGraph
from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.protos import expert_dispatch_pb2_grpc as pb_grpc
from expertmesh.transport.auth import call_metadata
from expertmesh.transport.codec import to_proto
from expertmesh.transport.grpc_dispatch import ExpertShardServicer
from expertmesh.transport.grpc_server import start_server
from tests.graph.fixtures import cluster_fixtures, generate_with, local_tokens
from tests.server.app_server import API_KEY, running_app

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(3 + i, 3 + i + n))} for i, n in enumerate([5, 17, 9, 2])]
TIMEOUT_S = 2.0  # the data plane's deadline in these graphs


class FaultyShard(ExpertShardActor):
    """An expert shard whose gRPC service can be told to misbehave once: stall, close its stream, or answer
    another step or shape than asked. Ray pings it like any other shard."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fault: tuple[str, float] | None = None

    def inject(self, kind: str, seconds: float = 0.0) -> None:
        self.fault = (kind, seconds)

    def serve_grpc(self) -> str:
        if self._server is None:
            inner = ExpertShardServicer(self.shard)
            self._server, self._address = start_server(
                pb_grpc.add_ExpertShardServicer_to_server, _Misbehaving(inner, self), node_info()["ip"],
                secret=self._secret, settings=self._data_plane, what="faulty-shard")
        return self._address


class _Misbehaving(pb_grpc.ExpertShardServicer):  # Train, not faulted here: UNIMPLEMENTED
    def __init__(self, inner: ExpertShardServicer, actor: FaultyShard):
        self.inner, self.actor = inner, actor

    def Dispatch(self, request_iterator, context):
        for response in self.inner.Dispatch(request_iterator, context):
            fault, self.actor.fault = self.actor.fault, None
            if fault is None:
                yield response
            elif fault[0] == "stall":
                time.sleep(fault[1])
                yield response
            elif fault[0] == "close":
                context.abort(grpc.StatusCode.UNAVAILABLE, "the shard closed the stream")
            elif fault[0] == "stale":
                yield pb.ExpertResponse(step=response.step - 1, layer=response.layer, output=response.output)
            elif fault[0] == "shape":
                rows, hidden = response.output.shape
                yield pb.ExpertResponse(step=response.step, layer=response.layer,
                                        output=to_proto(torch.zeros(rows + 1, hidden)))


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the shard class travels to Ray's workers


cluster, free_cluster = cluster_fixtures(3)


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return local_tokens(tiny_model_dir, PROMPTS, PARAMS)


def graph(**extra) -> ActorGraph:
    deployment = {"expert_shards": 2, "transport": "grpc", "data_plane_timeout_s": TIMEOUT_S, **extra}
    return ActorGraph(deployment, shard_class=FaultyShard)


def at_step(n: int, action):
    return lambda i: action() if i == n else None


def test_a_route_stream_taken_over_is_reopened_and_the_step_retried(tiny_model_dir, local):
    with LLM(str(tiny_model_dir), executor=graph()) as llm:
        executor = llm.llm_engine.executor
        address = ray.get(executor.router.serve_attention.remote(0))
        streams, idle = [], threading.Event()

        def take_over() -> None:  # a second connection for rank 0, with the graph's secret
            channel = grpc.insecure_channel(address)
            streams.append((channel, pb_grpc.MoERouterStub(channel).Route(
                iter(idle.wait, True), metadata=call_metadata(executor.builder.secret, ("attention-rank", "0")))))

        def during_step(i: int) -> None:  # while steps 3 and 6 run: the stream breaks mid-step
            if i in (3, 6):
                threading.Timer(0.01, take_over).start()

        try:
            assert generate_with(llm, PROMPTS, PARAMS, during_step) == local
        finally:
            idle.set()
            for channel, stream in streams:
                stream.cancel()
                channel.close()
        assert len(streams) == 2 and ray.get(executor.attention[0].reconnects.remote()) == 2
        # a stream that broke mid-step failed that step, which was retried once the link reopened (one that
        # broke between steps is reopened before the next step sends anything, and nothing fails)
        assert set(executor.recoveries) <= {"retried the step with every actor alive"}


@pytest.mark.parametrize("fault", ["close", "stale", "shape"])
def test_a_dispatch_stream_closed_or_an_answer_out_of_step_fails_the_step_which_is_retried(
        tiny_model_dir, local, fault):
    with LLM(str(tiny_model_dir), executor=graph()) as llm:
        executor = llm.llm_engine.executor
        shard = executor.shards[1]
        inject = at_step(4, lambda: ray.get(shard.inject.remote(fault)))
        assert generate_with(llm, PROMPTS, PARAMS, inject) == local
        assert len(executor.recoveries) == 1
        if fault == "close":  # a closed stream is reopened: the shard itself stays
            assert executor.shards[1] is shard
        else:  # a shard that answers out of step is not trusted again
            assert executor.recoveries == ["expert shard 1"] and executor.shards[1] is not shard


def test_a_shard_that_stalls_in_dispatch_is_replaced_within_the_deadline(tiny_model_dir, local):
    with LLM(str(tiny_model_dir), executor=graph()) as llm:
        executor = llm.llm_engine.executor
        stalled = executor.shards[0]
        times = {}

        def stall(i: int) -> None:
            if i == 3:
                ray.get(stalled.inject.remote("stall", 120.0))  # answers pings all along
            times[i] = time.monotonic()

        assert generate_with(llm, PROMPTS, PARAMS, stall) == local
        assert executor.recoveries == ["expert shard 0"] and executor.shards[0] is not stalled
        # the stall was noticed after TIMEOUT_S, not after the 120 s it would have lasted
        assert times[4] - times[3] < 60


def test_strangers_on_every_data_plane_port_are_refused_and_the_generation_goes_on(tiny_model_dir, local):
    with LLM(str(tiny_model_dir), executor=graph()) as llm:
        executor = llm.llm_engine.executor
        router_address = ray.get(executor.router.serve_attention.remote(0))
        shard_addresses = ray.get([s.serve_grpc.remote() for s in executor.shards])
        codes = []

        def knock() -> None:
            hidden = to_proto(torch.zeros(2, 128))
            with grpc.insecure_channel(router_address) as channel:
                claim = pb.RouteRequest(step=1, micro_batch=0, layer=1, hidden_states=hidden)
                stream = pb_grpc.MoERouterStub(channel).Route(iter([claim]), metadata=(("attention-rank", "0"),),
                                                              timeout=10)
                codes.append(_code(stream))
            for address in shard_addresses:
                with grpc.insecure_channel(address) as channel:
                    request = pb.ExpertRequest(step=1, layer=1, placement_version=0, hidden_states=hidden,
                                               expert_ids=to_proto(torch.zeros(2, 1, dtype=torch.int64)),
                                               weights=to_proto(torch.ones(2, 1)))
                    codes.append(_code(pb_grpc.ExpertShardStub(channel).Dispatch(iter([request]), timeout=10)))

        assert generate_with(llm, PROMPTS, PARAMS, at_step(3, knock)) == local
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
        assert executor.recoveries == []  # nothing the strangers did reached the graph


def _code(stream) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    return info.value.code()


def test_a_replacement_that_cannot_be_placed_fails_its_step_with_503_and_the_server_goes_on(
        cluster, tiny_model_dir, local):
    home = cluster.add_node(num_cpus=1, resources={"expertmesh_shard_home": 1})
    cluster.wait_for_nodes()
    deployment = {"expert_shards": 1, "transport": "grpc", "recovery_timeout_s": 5,
                  "shard_resources": {"num_cpus": 0.5, "resources": {"expertmesh_shard_home": 1}}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "prompt": [3, 4, 5, 6, 7], "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    with running_app(tiny_model_dir, executor=ActorGraph(deployment), served_model_name="tiny") as (url, engine):
        assert httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, headers=headers,
                          timeout=120).status_code == 200
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                               headers=headers) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")  # the request is running
                cluster.remove_node(home, allow_graceful=False)  # the only node that can hold the shard
                start = time.monotonic()
                events = [line for line in lines if line.startswith("data: ")]
        assert any('"code": "server_error"' in e and "service_unavailable" in e for e in events), events[-3:]
        assert time.monotonic() - start < 120  # gave up after recovery_timeout_s, never hung
        assert engine.alive
        answer = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, headers=headers, timeout=120)
        assert answer.status_code == 503  # still no node for the shard: refused, the server alive
        cluster.add_node(num_cpus=1, resources={"expertmesh_shard_home": 1})  # a node comes back
        cluster.wait_for_nodes()
        again = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 4}, headers=headers, timeout=180)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] is not None
