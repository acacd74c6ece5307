"""Faults in the middle of a generation on a 4-node cluster (every node at 127.0.0.1): a killed expert shard,
a shard killed while a step is in flight, a killed attention actor (its cache is lost), a collective graph
losing a shard, and a whole node lost. expertmesh itself notices (actors run with max_restarts=0 and are
killed with no_restart=True), replaces what died, and every request finishes with local mode's tokens.
Deployments that cannot work are refused before anything starts."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
import torch

from expertmesh import LLM, SamplingParams
from expertmesh.graph import ActorGraph
from tests.graph.fixtures import cluster_fixtures, generate_with, local_tokens, node_of, settle
from tests.hf_models import build_hf_checkpoint, make_prompts

pytestmark = pytest.mark.timeout(600)

PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


cluster, free_cluster = cluster_fixtures(4)  # one node more than a graph needs: room to replace a lost node


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    ckpt = build_hf_checkpoint("deepseek_v3", tmp_path_factory.mktemp("dsv3"), num_hidden_layers=3)
    prompts = [{"prompt_token_ids": p} for p in make_prompts(223, [5, 23, 12, 2], seed=7)]
    return str(ckpt), prompts, local_tokens(ckpt, prompts, PARAMS)


def kill_at(step: int, actor_of, *, concurrently: bool = False):
    """A `before_step` that kills `actor_of()` at `step`: right away, or from another thread while the step
    runs. Before the step after that, it waits for the process to be gone (a killed actor's process takes a
    moment to exit and keeps serving its data plane meanwhile), so the run always meets the loss."""
    killed, pids = [], []

    def before_step(i: int) -> None:
        if i == step:
            actor = actor_of()
            killed.append(actor)
            pids.append(ray.get(actor.ping.remote())["pid"])
            if concurrently:
                threading.Timer(0.005, ray.kill, args=(actor,), kwargs={"no_restart": True}).start()
                return
            ray.kill(actor, no_restart=True)
        if i in (step, step + 1) and pids and not (concurrently and i == step):
            wait_for_exit(pids[0])

    before_step.killed = killed
    return before_step


def wait_for_exit(pid: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive_pid(pid):
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.05)


def test_killed_shard_is_replaced_and_the_step_retried(cluster, model):
    ckpt, prompts, local = model
    with LLM(ckpt, executor=ActorGraph({"expert_shards": 3, "transport": "grpc"})) as llm:
        executor = llm.llm_engine.executor
        hook = kill_at(4, lambda: executor.shards[1])
        assert generate_with(llm, prompts, PARAMS, hook) == local
        assert any("expert shard 1" in r for r in executor.recoveries)
        assert executor.shards[1] is not hook.killed[0]
        assert ray.get(executor.shards[1].ping.remote())["num_experts"] > 0  # reloaded its experts


def test_shard_killed_while_a_step_is_in_flight(cluster, model):
    ckpt, prompts, local = model
    with LLM(ckpt, executor=ActorGraph({"expert_shards": 3, "transport": "grpc"})) as llm:
        executor = llm.llm_engine.executor
        hook = kill_at(6, lambda: executor.shards[2], concurrently=True)
        assert generate_with(llm, prompts, PARAMS, hook) == local
        assert any("expert shard 2" in r for r in executor.recoveries)


def test_killed_attention_actor_re_prefills_its_sequences(cluster, model):
    ckpt, prompts, local = model
    with LLM(ckpt, executor=ActorGraph({"attention_actors": 2, "expert_shards": 2, "transport": "grpc"})) as llm:
        executor = llm.llm_engine.executor
        assert generate_with(llm, prompts, PARAMS, kill_at(5, lambda: executor.attention[0])) == local
        assert any("attention actor 0" in r for r in executor.recoveries)


@pytest.mark.parametrize("transport", ["grpc", "inprocess"])
def test_killed_router_is_replaced(cluster, model, transport):
    """The router holds the gates and the placement; with "inprocess" it also holds every expert."""
    ckpt, prompts, local = model
    deployment = {"expert_shards": 2, "transport": transport, "router_resources": {"num_cpus": 0}}
    with LLM(ckpt, executor=ActorGraph(deployment)) as llm:
        executor = llm.llm_engine.executor
        assert generate_with(llm, prompts, PARAMS, kill_at(2, lambda: executor.router)) == local
        assert any("router" in r for r in executor.recoveries)


def test_collective_graph_recovers_from_a_killed_shard(cluster, model):
    ckpt, prompts, local = model
    with LLM(ckpt, executor=ActorGraph({"expert_shards": 2, "transport": "collective"})) as llm:
        executor = llm.llm_engine.executor
        assert generate_with(llm, prompts, PARAMS, kill_at(3, lambda: executor.shards[0])) == local
        assert any("expert shard 0" in r for r in executor.recoveries)


def settled_cpus() -> float:
    """Available CPUs once every earlier graph's actors have given theirs back."""
    settle()
    return ray.available_resources()["CPU"]


@pytest.mark.parametrize("deployment,needle", [
    ({"expert_shards": 2, "expert_placement": {0: [[1, 0], [1, 1]], 1: [[2, 0]]}}, "held by no shard"),
    ({"expert_shards": 2, "transport": "grpc", "shard_resources": {"num_gpus": 2}},
     "needs 4 GPUs but the cluster has 0"),
    ({"expert_shards": 64, "transport": "grpc"}, r"needs 66 CPUs but the cluster has \d+"),
    ({"transport": "pigeon"}, "transport must be one of"),
    ({"expert_shards": 0}, "expert_shards must be an integer >= 1"),
])
def test_unworkable_deployment_is_refused_before_anything_starts(cluster, model, deployment, needle):
    ckpt, _, _ = model
    before = settled_cpus()
    with pytest.raises(ValueError, match=needle):
        LLM(ckpt, executor=ActorGraph(deployment))
    time.sleep(0.5)  # an actor started by mistake would hold a CPU by now
    assert ray.available_resources()["CPU"] == before  # nothing was started


def test_lost_node_is_survived(cluster, model):
    """The node under a shard goes away (its actors become unreachable): the shard is replaced in a new
    placement group on a live node (the spare one)."""
    ckpt, prompts, local = model
    with LLM(ckpt, executor=ActorGraph({"expert_shards": 3, "transport": "grpc"})) as llm:
        executor = llm.llm_engine.executor
        head = cluster.head_node.node_id
        victim = next(s for s in executor.shards if node_of(s) != head)
        victim_node = next(n for n in cluster.worker_nodes if n.node_id == node_of(victim))
        victim_pid = ray.get(victim.ping.remote())["pid"]

        def before_step(i: int) -> None:
            if i == 4:
                cluster.remove_node(victim_node, allow_graceful=False)
                # the node's worker processes outlive its raylet for a moment (still serving gRPC): go on
                # once the shard's process is really gone, so a step meets the loss
                wait_for_exit(victim_pid)

        assert generate_with(llm, prompts, PARAMS, before_step) == local
        assert executor.recoveries
        assert all(node_of(s) != victim_node.node_id for s in executor.shards)


def _alive_pid(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
