"""A multi-node Ray cluster on this machine (every node at 127.0.0.1) and helpers for actor-graph tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import ray  # tests/conftest.py has set Ray's environment (127.0.0.1 stays 127.0.0.1)
from ray.cluster_utils import Cluster

from expertmesh import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def start_cluster(num_nodes: int, cpus_per_node: int = 2) -> Cluster:
    """Head plus worker nodes, joined by this process; stop it with `stop_cluster`."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node})
    try:
        for _ in range(num_nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def cluster_fixtures(num_nodes: int):
    """A test module's `cluster` (module-scoped, `num_nodes` nodes of 2 CPUs) and an autouse fixture that
    starts each test on an idle cluster, so SPREAD really spreads its graph. In the module:
    `cluster, free_cluster = cluster_fixtures(3)`."""

    @pytest.fixture(scope="module")
    def cluster():
        cluster = start_cluster(num_nodes)
        yield cluster
        stop_cluster(cluster)

    @pytest.fixture(autouse=True)
    def free_cluster(cluster):
        settle()

    return cluster, free_cluster


def settle(timeout_s: float = 60) -> None:
    """Waits until every CPU of the cluster is free again: actors of an earlier graph give theirs back a
    moment after they are killed, and a placement group made meanwhile would be squeezed onto fewer nodes."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, "an earlier test's actors still hold CPUs"
        time.sleep(0.1)


def node_of(actor) -> str:
    return ray.get(actor.ping.remote())["node_id"]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def local_tokens(model_dir, prompts, params=GREEDY) -> list[list[int]]:
    return token_ids(LLM(str(model_dir)).generate(prompts, params))


def generate_with(llm: LLM, prompts, params: SamplingParams, before_step: Callable[[int], None],
                  lora_requests=None) -> list[list[int]]:
    """Runs the engine step by step, calling `before_step(i)` before step i (to inject a fault, swap a
    placement...); every request's tokens, in prompt order. `lora_requests`: one LoRARequest or None per prompt."""
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params, index=i, lora_request=lora_requests[i] if lora_requests else None)
    done: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished_requests():
        before_step(step)
        step += 1
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]
