"""A multi-node Ray cluster on this machine (every node at 127.0.0.1) and helpers for actor-graph tests."""

from __future__ import annotations

import time

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
