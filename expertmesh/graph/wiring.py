"""Sets up the data plane between a graph's actors, per transport (again after any replacement)."""

from __future__ import annotations

from expertmesh.graph.builder import Member
from expertmesh.graph.runtime import ray


def wire(transport: str, attention: list[Member], router: Member, shards: list[Member], *, first_step: int,
         timeout_s: float) -> None:
    """Connects every actor; `first_step` is the next step the executor will run (the router takes
    messages of the step under way and the next one only)."""
    def get(refs):
        return ray.get(refs, timeout=timeout_s)

    if transport == "collective":
        a = len(attention)
        world = 1 + a + len(shards)
        ip, port = router.info["ip"], get(router.handle.free_port.remote())
        init = f"tcp://{ip}:{port}"
        attention_ranks = {m.index: 1 + i for i, m in enumerate(attention)}
        shard_ranks = {m.index: 1 + a + i for i, m in enumerate(shards)}
        calls = [router.handle.join_collective.remote(init, world, attention_ranks, shard_ranks)]
        calls += [m.handle.join_collective.remote(init, attention_ranks[m.index], world) for m in attention]
        calls += [m.handle.join_collective.remote(init, shard_ranks[m.index], world) for m in shards]
        get(calls)
        return
    address = get(router.handle.serve_attention.remote(first_step))
    if transport != "inprocess":  # "inprocess": the router loaded every shard's experts when it started
        addresses = get([m.handle.serve_grpc.remote() for m in shards])
        get(router.handle.connect_shards.remote({m.index: addr for m, addr in zip(shards, addresses)}))
    get([m.handle.connect_router.remote(address) for m in attention])
