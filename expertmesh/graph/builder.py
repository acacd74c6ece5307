"""Starts and stops the actors of one graph, each in a Ray placement group of its own.

One placement group per actor (a single bundle) lets one shard be added, replaced or removed without
touching the others, and a replacement for an actor on a lost node is simply a new group placed on a live
node. The deployment's `placement_strategy` still decides where the groups go, through the node each new
group is aimed at: SPREAD and PACK aim softly (the node with the fewest, or the most, of this graph's
actors that has room; Ray places the group elsewhere when it does not fit), STRICT_SPREAD and STRICT_PACK
insist (a node of its own; the node of the graph's first actor).
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from dataclasses import dataclass, field

from expertmesh.graph.runtime import ACTOR_NAMESPACE, ray  # first: it sets Ray's environment before Ray loads
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group  # noqa: I001
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from expertmesh.actors import AttentionActor, ExpertShardActor, RouterActor
from expertmesh.actors.step import AdapterSpec
from expertmesh.experts import PlacementTable
from expertmesh.graph.deployment import ActorResources, DeploymentConfig

START_TIMEOUT_S = 600.0  # from placed to answering: an actor loads its part of the checkpoint meanwhile
MIN_BUNDLE_CPU = 0.01  # an actor that asks for no resources still needs a bundle: a sliver of a CPU
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries it: a hard aim at one node


@dataclass(eq=False)
class Member:
    """One actor of the graph: its role, its index within the role, its handle and placement group."""

    role: str  # "attention", "router" or "shard"
    index: int
    handle: object
    pg: PlacementGroup
    name: str
    bundle: dict[str, float]
    node_id: str | None = None  # where its group was aimed or, once it answered a ping, where it runs
    placed: bool = False  # its placement group is ready
    info: dict = field(default_factory=dict)  # its first ping

    @property
    def label(self) -> str:
        return label(self.role, self.index)


class GraphBuilder:
    def __init__(self, model_dir: str, deployment: DeploymentConfig, *, dtype: str, num_blocks: int, block_size: int,
                 secret: str, shard_class: type = ExpertShardActor, max_loras: int = 0, max_lora_rank: int = 16,
                 quantization: str | None = None, kv_cache_dtype: str = "auto", activation_dtype: str = "auto"):
        self.model_dir, self.deployment, self.dtype = model_dir, deployment, dtype
        self.kv_cache_dtype = kv_cache_dtype  # the attention actors' caches
        self.activation_dtype = activation_dtype  # the hidden states' dtype, on every actor
        self.quantization = quantization  # every actor's share: the shards' experts, the attention actors' linears
        # the LoRA slots every actor serves, and the adapter each loaded slot holds: an actor started later (a
        # replacement, a new shard) loads them as it starts
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.adapters: dict[int, str] = {}
        self.num_blocks, self.block_size, self.secret = num_blocks, block_size, secret
        self.shard_class = shard_class
        self.graph_id = uuid.uuid4().hex[:8]
        self._generation = itertools.count()

    def resources(self, role: str) -> ActorResources:
        d = self.deployment
        return {"attention": d.attention_resources, "router": d.router_resources, "shard": d.shard_resources}[role]

    # -- starting ------------------------------------------------------------------------------------
    def start_attention(self, rank: int, others: list[Member]) -> Member:
        r = self.resources("attention")
        return self._start("attention", rank, others, AttentionActor, dict(
            rank=rank, dtype=self.dtype, num_blocks=self.num_blocks, block_size=self.block_size, secret=self.secret,
            data_plane=self.deployment.data_plane("attention"), num_threads=_threads(r), lora=self.lora(),
            kv_cache_dtype=self.kv_cache_dtype, quantization=self.quantization,
            activation_dtype=self.activation_dtype))

    def start_router(self, placement: PlacementTable, others: list[Member]) -> Member:
        d = self.deployment
        return self._start("router", 0, others, RouterActor, dict(
            placement=placement.to_dict(), dtype=self.dtype, transport=d.transport,
            attention_ranks=list(range(d.attention_actors)), secret=self.secret, data_plane=d.data_plane("router"),
            num_threads=_threads(self.resources("router")), lora=self.lora(), quantization=self.quantization,
            activation_dtype=self.activation_dtype))

    def start_shard(self, index: int, placement: PlacementTable, others: list[Member]) -> Member:
        return self._start("shard", index, others, self.shard_class, dict(
            experts=placement.shard_experts(index), shard_index=index, dtype=self.dtype,
            placement_version=placement.version, secret=self.secret, data_plane=self.deployment.data_plane("shard"),
            num_threads=_threads(self.resources("shard")), lora=self.lora(), quantization=self.quantization,
            activation_dtype=self.activation_dtype))

    def lora(self) -> AdapterSpec | None:
        return AdapterSpec(self.max_loras, self.max_lora_rank, dict(self.adapters)) if self.max_loras else None

    def _start(self, role: str, index: int, others: list[Member], cls: type, kwargs: dict) -> Member:
        """Reserves the actor's placement group and starts it there; neither is waited for (`wait_ready`)."""
        bundle = self.resources(role).bundle() or {"CPU": MIN_BUNDLE_CPU}
        node, hard = self._aim(bundle, others)
        options: dict = {"strategy": "STRICT_PACK", "name": ""}
        if node is not None and hard:
            options["bundle_label_selector"] = [{NODE_ID_LABEL: node}]
        elif node is not None:
            options["_soft_target_node_id"] = node
        pg = placement_group([bundle], **options)
        r = self.resources(role)
        # named `expertmesh-<graph>-<role><index>-<n>` in the "expertmesh" namespace, so operators (and tests)
        # find them with `ray.util.list_named_actors`; `n` counts up, since a replacement may start before
        # Ray has released the dead actor's name
        name = f"expertmesh-{self.graph_id}-{role}{index}-{next(self._generation)}"
        handle = ray.remote(cls).options(
            name=name, namespace=ACTOR_NAMESPACE, num_cpus=r.num_cpus, num_gpus=r.num_gpus,
            resources=dict(r.resources), max_concurrency=4, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(self.model_dir, **kwargs)
        return Member(role, index, handle, pg, name, bundle, node_id=node)

    def _aim(self, bundle: dict[str, float], others: list[Member]) -> tuple[str | None, bool]:
        """(node to aim the new group at, whether it must go there), from the live nodes' resources less what
        this graph's other actors hold on them. Among nodes that would do, those with resources the actor does
        not ask for (GPUs, a worker group's custom resource) come last: the actors that need them may follow."""
        strategy = self.deployment.placement_strategy
        mine = Counter(m.node_id for m in others if m.node_id is not None)
        if strategy == "STRICT_PACK" and mine:
            return next(iter(mine)), True
        used: dict[str, Counter] = {}
        for m in others:
            if m.node_id is not None:
                used.setdefault(m.node_id, Counter()).update(m.bundle)
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n.get("Alive")}
        room = [n for n, total in nodes.items() if _fits(bundle, total, used.get(n))]
        spare = {n: len(_special(nodes[n]) - set(bundle)) for n in room}
        if strategy == "STRICT_SPREAD":
            free = [n for n in room if not mine[n]]
            if not free:
                if self.deployment.cluster_autoscales:
                    return None, False  # a node the autoscaler adds will take it
                raise ValueError("placement_strategy STRICT_SPREAD needs a node of its own for every actor, and no "
                                 f"node has room for another {bundle} (the graph holds nodes {sorted(mine)})")
            return min(free, key=lambda n: spare[n]), True
        if not room:
            return None, False  # let Ray (and its autoscaler) find a place
        if strategy == "PACK":
            return min(room, key=lambda n: (-mine[n], spare[n])), False
        return min(room, key=lambda n: (mine[n], spare[n])), strategy == "STRICT_PACK"

    # -- waiting and stopping ------------------------------------------------------------------------
    def wait_ready(self, members: list[Member], timeout_s: float, what: str) -> None:
        """Waits until every member's group is placed (at most `timeout_s`) and then until each actor answers a
        ping (at most START_TIMEOUT_S: loading a large checkpoint's part takes a while). TimeoutError naming
        the actors that were not placed, and what they asked for. Records where each one runs."""
        if not members:
            return
        placed = {m.pg.ready(): m for m in members}
        ready, _ = ray.wait(list(placed), num_returns=len(placed), timeout=timeout_s)
        for ref in ready:
            placed[ref].placed = True
        late = [m for ref, m in placed.items() if ref not in ready]
        if late:
            asked = "; ".join(f"{m.label} needs {m.bundle}" for m in late)
            raise TimeoutError(f"{what}: {', '.join(m.label for m in late)} not placed within {timeout_s:g} s "
                               f"({asked}; the cluster has {_resources(ray.cluster_resources())} in all, "
                               f"{_resources(ray.available_resources())} free)")
        pings = {m.handle.ping.remote(): m for m in members}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=START_TIMEOUT_S)
        late = [m for ref, m in pings.items() if ref not in ready]
        if late:
            raise TimeoutError(f"{what}: {', '.join(m.label for m in late)} placed but not started within "
                               f"{START_TIMEOUT_S:g} s")
        for ref, m in pings.items():
            m.info = ray.get(ref)  # raises RayActorError for an actor that died while starting
            m.node_id = m.info["node_id"]

    def stop(self, member: Member) -> None:
        """Ends the actor and gives its placement group back (either may already be gone)."""
        try:
            ray.kill(member.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        try:
            remove_placement_group(member.pg)
        except Exception:  # noqa: BLE001 - already removed
            pass


def label(role: str, index: int) -> str:
    """How errors and operators name an actor of the graph."""
    return {"attention": f"attention actor {index}", "router": "router", "shard": f"expert shard {index}"}[role]


def _threads(r: ActorResources) -> int:
    """Torch threads of an actor: the CPUs it reserved, at least one."""
    return max(1, int(r.num_cpus))


def _fits(bundle: dict[str, float], total: dict[str, float], used: Counter | None) -> bool:
    used = used or Counter()
    return all(total.get(k, 0.0) - used.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items())


def _special(resources: dict[str, float]) -> set[str]:
    """A node's resources beyond CPUs and memory: GPUs and custom ones."""
    return {k for k, v in resources.items() if v > 0 and k not in ("CPU", "memory", "object_store_memory")
            and not k.startswith("node:")}


def _resources(resources: dict[str, float]) -> str:
    # what an operator sized the deployment by: not the per-node or per-placement-group bookkeeping entries
    shown = {k: v for k, v in sorted(resources.items())
             if not k.startswith("node:") and "memory" not in k and "_group_" not in k}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}"
