"""Builds one model replica's actor graph from a deployment config and runs the engine's steps on it.

`ActorGraphExecutor` is the engine's executor for actor mode (same `execute` as `LocalExecutor`). It
reserves a Ray placement group for every actor (attention actors, the router, the expert shards) with the
deployment's strategy, starts the actors in their bundles, wires the data plane, and per step makes one
call per actor. It owns recovery: when a step fails it finds the dead actors, starts replacements in the
same bundles (a shard reloads its experts; an attention actor starts with an empty cache and its sequences
are re-prefilled from their token history when next scheduled), rewires, and retries the step.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # else Ray rewrites 127.0.0.1 on Linux

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.exceptions import GetTimeoutError, RayActorError  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from expertmesh.actors.attention import MicroBatch  # noqa: E402
from expertmesh.actors.ray_actors import AttentionActor, ExpertShardActor, RouterActor  # noqa: E402
from expertmesh.engine.scheduler import ScheduledBatch  # noqa: E402
from expertmesh.model.config import ModelConfig  # noqa: E402
from expertmesh.platform.deployment import ActorResources, DeploymentConfig  # noqa: E402

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 30.0
ABORT_GRACE_S = 30.0
RECOVERY_ROUNDS = 10
MIN_BUNDLE_CPU = 0.01  # how long a failed step's other calls get to return once told to abort


ACTOR_NAMESPACE = "expertmesh"


class StepFailed(RuntimeError):
    pass


def connect_ray(address: str | None, num_cpus: float = 0) -> bool:
    """Joins `address` (or $RAY_ADDRESS), or starts a private local cluster; True if we started it.

    A cluster we start declares at least `num_cpus` logical CPUs, so a deployment sized for a real cluster
    still fits on one machine (its actors spend much of a step waiting on one another)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    # "local": a fresh cluster of our own, never whatever stale cluster ray_current_cluster names
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)))
    return True


@dataclass(slots=True)
class _Seq:
    rank: int  # the attention actor holding its cache
    seq: object  # engine Sequence


class ActorGraphExecutor:
    def __init__(self, model_dir: str | Path, deployment: DeploymentConfig, *, dtype: str, num_blocks: int,
                 block_size: int, max_retries: int = 3):
        self.model_dir, self.deployment, self.dtype = str(model_dir), deployment, dtype
        self.num_blocks, self.block_size, self.max_retries = num_blocks, block_size, max_retries
        self.device = torch.device("cpu")  # logits come back to the driver's CPU
        model_config = ModelConfig.from_pretrained(model_dir)
        self.placement = deployment.placement_for(model_config)  # refused here if experts are left out
        self.moe_layers = list(self.placement.moe_layers)
        # an actor that asks for no resources still needs a bundle: it gets a sliver of a CPU
        self._bundle_resources = self._bundles()
        self._graph_id, self._generation = uuid.uuid4().hex[:8], itertools.count()
        self._bundle_specs = [r.bundle() or {"CPU": MIN_BUNDLE_CPU} for r in self._bundle_resources]
        self._owns_ray = connect_ray(deployment.ray_address, sum(b.get("CPU", 0) for b in self._bundle_specs))
        self.pg = None
        try:
            if not deployment.cluster_autoscales:
                deployment.check_cluster(ray.cluster_resources())
            self._reserve()
            self.attention: list = [self._start_attention(r) for r in range(deployment.attention_actors)]
            self.router = self._start_router()
            self.shards: list = []
            if deployment.transport != "inprocess":
                self.shards = [self._start_shard(s) for s in range(deployment.expert_shards)]
            self._wait_started()
            self._wire()
        except BaseException:
            self.shutdown()
            raise
        self._steps = itertools.count(1)
        self._seqs: dict[int, _Seq] = {}  # seq_id -> where its cache lives
        self._lost: set[int] = set()  # sequences whose cache died with an attention actor
        self.recoveries: list[str] = []  # what recovery did, for operators and tests
        self._needs_restart = False
        # Ray calls made by each step (the per-layer traffic goes over the data plane, never through Ray)
        self.calls_per_step: deque[int] = deque(maxlen=1024)

    # -- building ------------------------------------------------------------------------------------
    def _bundles(self) -> list[ActorResources]:
        d = self.deployment
        shards = d.expert_shards if d.transport != "inprocess" else 0  # "inprocess": shards live in the router
        return [d.attention_resources] * d.attention_actors + [d.router_resources] + [d.shard_resources] * shards

    def _reserve(self) -> None:
        bundles = self._bundle_specs
        self.pg = placement_group(bundles, strategy=self.deployment.placement_strategy, name="")
        try:
            ray.get(self.pg.ready(), timeout=self.deployment.placement_timeout_s)
        except GetTimeoutError:
            raise RuntimeError(
                f"the cluster could not place the deployment's {len(bundles)} actors with strategy "
                f"{self.deployment.placement_strategy} within {self.deployment.placement_timeout_s:g} s: "
                f"bundles {bundles}, cluster resources {ray.cluster_resources()}"
            ) from None

    def _options(self, bundle: int, role: str) -> dict:
        """Ray options of the actor in `bundle`. Actors are named `expertmesh-<graph>-<role>-<n>` in the
        "expertmesh" namespace, so operators (and tests) can find them with `ray.util.list_named_actors`;
        `n` counts up, since a replacement may start before Ray has released the dead actor's name."""
        r = self._bundle_resources[bundle]
        return {
            "name": f"expertmesh-{self._graph_id}-{role}-{next(self._generation)}", "namespace": ACTOR_NAMESPACE,
            "num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "resources": dict(r.resources),
            "max_concurrency": 4, "max_restarts": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle),
        }

    @staticmethod
    def _threads(r: ActorResources) -> int:
        return max(1, int(r.num_cpus))

    def _start_attention(self, rank: int):
        r = self._bundle_resources[rank]
        return ray.remote(AttentionActor).options(**self._options(rank, f"attention{rank}")).remote(
            self.model_dir, rank=rank, dtype=self.dtype, num_blocks=self.num_blocks, block_size=self.block_size,
            num_threads=self._threads(r))

    def _router_bundle(self) -> int:
        return self.deployment.attention_actors

    def _start_router(self):
        b = self._router_bundle()
        return ray.remote(RouterActor).options(**self._options(b, "router")).remote(
            self.model_dir, self.placement.to_dict(), dtype=self.dtype, transport=self.deployment.transport,
            num_threads=self._threads(self._bundle_resources[b]))

    def _start_shard(self, shard: int):
        b = self._router_bundle() + 1 + shard
        return ray.remote(ExpertShardActor).options(**self._options(b, f"shard{shard}")).remote(
            self.model_dir, self.placement.shard_experts(shard), shard_index=shard, dtype=self.dtype,
            placement_version=self.placement.version, num_threads=self._threads(self._bundle_resources[b]))

    def _actors(self) -> list:
        return [*self.attention, self.router, *self.shards]

    def _wait_started(self) -> None:
        """Waits for every actor to be up, and settles the number of micro-batches from where they run."""
        info = ray.get([a.ping.remote() for a in self._actors()])
        attention_nodes = {i["node_id"] for i in info[: len(self.attention)]}
        expert_nodes = {i["node_id"] for i in (info[len(self.attention) + 1 :] or info[len(self.attention) :])}
        self.micro_batches = self.deployment.micro_batches
        if self.micro_batches == "auto":  # ping-pong only pays where attention and experts use different cores
            self.micro_batches = 1 if attention_nodes & expert_nodes else 2

    def _wire(self) -> None:
        """Sets up the data plane between every actor (again after a replacement)."""
        transport = self.deployment.transport
        if transport == "collective":
            a, s = len(self.attention), len(self.shards)
            world = 1 + a + s
            ip = ray.get(self.router.ping.remote())["ip"]
            port = ray.get(self.router.free_port.remote())
            init = f"tcp://{ip}:{port}"
            calls = [self.router.join_collective.remote(init, world, list(range(1, a + 1)),
                                                        list(range(a + 1, a + 1 + s)))]
            calls += [att.join_collective.remote(init, 1 + i, world) for i, att in enumerate(self.attention)]
            calls += [sh.join_collective.remote(init, 1 + a + i, world) for i, sh in enumerate(self.shards)]
            ray.get(calls)
            return
        address = ray.get(self.router.serve_attention.remote())
        if transport == "inprocess":
            assignment = {s: self.placement.shard_experts(s) for s in range(self.deployment.expert_shards)}
            ray.get(self.router.host_shards.remote(assignment))
        else:
            addresses = ray.get([sh.serve_grpc.remote() for sh in self.shards])
            ray.get(self.router.connect_shards.remote(addresses))
        ray.get([att.connect_router.remote(address) for att in self.attention])

    # -- a step --------------------------------------------------------------------------------------
    def _forget_finished(self) -> None:
        for seq_id in [i for i, s in self._seqs.items() if s.seq.is_finished]:
            del self._seqs[seq_id]
            self._lost.discard(seq_id)

    def _home(self, seq) -> int:
        entry = self._seqs.get(seq.seq_id)
        if entry is None:
            load = [0] * len(self.attention)
            for s in self._seqs.values():
                load[s.rank] += 1
            entry = self._seqs[seq.seq_id] = _Seq(rank=min(range(len(load)), key=load.__getitem__), seq=seq)
        return entry.rank

    def _plan(self, batch: ScheduledBatch, all_logits: bool):
        """Per attention actor, up to two micro-batches; the router's plan; where each logits row comes from."""
        per_rank: dict[int, list[tuple[int, object, int, bool]]] = {}
        for i, (seq, n, sample) in enumerate(zip(batch.seqs, batch.num_new_tokens, batch.sample_mask)):
            per_rank.setdefault(self._home(seq), []).append((i, seq, n, sample))
        inputs: dict[int, list[MicroBatch | None]] = {}
        rows: list[tuple[int, int, int]] = []  # (rank, micro-batch, row) per output row, in batch order
        order: list[tuple[int, int]] = []  # (batch index, output rows) to put rows back in batch order
        plan: list[dict[int, int]] = [{}, {}]
        for rank, items in per_rank.items():
            halves = _split_two(items) if len(items) > 1 and self.micro_batches == 2 else [items]
            inputs[rank] = [None, None]
            for mb, part in enumerate(halves):
                ids, qlens, clens, tables, logits_rows = [], [], [], [], []
                for i, seq, n, sample in part:
                    start = seq.num_computed_tokens
                    first = 0 if seq.seq_id in self._lost else start  # lost cache: recompute from token 0
                    ids.extend(seq.token_ids[first : start + n])
                    offset = len(ids)
                    qlens.append(start + n - first)
                    clens.append(start + n)
                    tables.append(seq.block_table)
                    wanted = range(offset - n, offset) if all_logits else ([offset - 1] if sample else [])
                    order.append((i, len(wanted)))
                    for row in wanted:
                        rows.append((rank, mb, len(logits_rows)))
                        logits_rows.append(row)
                inputs[rank][mb] = MicroBatch(ids, qlens, clens, tables, logits_rows)
                plan[mb][rank] = len(ids)
        plan = [p for p in plan if p]
        return inputs, plan, rows, order

    def execute(self, batch: ScheduledBatch, *, all_logits: bool = False) -> torch.Tensor:
        self._forget_finished()
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            inputs, plan, rows, order = self._plan(batch, all_logits)
            try:
                results = self._run(next(self._steps), inputs, plan)
            except StepFailed as e:
                last = e
                log.warning("actor-graph step failed (attempt %d): %s", attempt + 1, e)
                self._recover()
                continue
            for seq in batch.seqs:
                self._lost.discard(seq.seq_id)
            return self._assemble(results, rows, order)
        raise RuntimeError(f"the step failed {self.max_retries + 1} times; last error: {last}")

    @staticmethod
    def _assemble(results, rows, order) -> torch.Tensor:
        """Logits rows back in the batch's order (`rows` and `order` follow the micro-batch layout)."""
        if not rows:
            return torch.empty(0, 0)
        starts = list(itertools.accumulate((n for _, n in order), initial=0))
        index = [r for (_, n), start in sorted(zip(order, starts)) for r in range(start, start + n)]
        picked = [results[rank][mb][row] for rank, mb, row in (rows[i] for i in index)]
        return torch.from_numpy(np.stack(picked))  # a fresh, writable array: the sampler bans tokens in place

    def _run(self, step: int, inputs: dict[int, list[MicroBatch | None]], plan: list[dict[int, int]]):
        calls: dict = {self.router.step.remote(step, plan): ("router", None)}
        for rank, mbs in inputs.items():
            calls[self.attention[rank].execute.remote(step, mbs)] = ("attention", rank)
        if self.deployment.transport == "collective":
            active = [mb for mb, counts in enumerate(plan) if any(counts.values())]
            for s, shard in enumerate(self.shards):
                slots = [(layer, mb) for layer in self.moe_layers if self.placement.holds_layer(s, layer)
                         for mb in active]
                calls[shard.serve_step.remote(slots)] = ("shard", s)
        self.calls_per_step.append(len(calls))
        pending = list(calls)
        results: dict[int, list] = {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            role, who = calls[done[0]]
            try:
                value = ray.get(done[0])
            except Exception as e:  # an actor died, or raised: abort the others' waits, then fail the step
                self._abort(step, pending, calls, f"{role} {'' if who is None else who} failed: {_short(e)}")
                raise StepFailed(f"{role}{'' if who is None else f' {who}'}: {_short(e)}") from e
            if role == "attention":
                results[who] = value
        return results

    def _abort(self, step: int, pending: list, calls: dict, reason: str) -> None:
        if self.deployment.transport == "collective":
            # a receive blocked in torch.distributed cannot be interrupted: the whole graph is restarted
            for actor in self._actors():
                ray.kill(actor, no_restart=True)
            self._needs_restart = True
        else:
            for actor in [self.router, *self.attention]:
                actor.abort.remote(step, reason)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=ABORT_GRACE_S)

    # -- recovery ------------------------------------------------------------------------------------
    def _alive(self, actor) -> bool:
        try:
            ray.get(actor.ping.remote(), timeout=PING_TIMEOUT_S)
            return True
        except (RayActorError, GetTimeoutError):
            return False

    def unhealthy(self, timeout_s: float = 5.0) -> list[str]:
        """The actors that do not answer a ping within `timeout_s` (all pinged at once); [] when all do."""
        named = [(f"attention actor {r}", a) for r, a in enumerate(self.attention)]
        named.append(("router", self.router))
        named += [(f"expert shard {s}", a) for s, a in enumerate(self.shards)]
        refs = {}
        bad = [name for name, actor in named if actor is None]
        for name, actor in named:
            if actor is not None:
                refs[actor.ping.remote()] = name
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in refs:
            if ref not in ready:
                bad.append(refs[ref] + " (no answer)")
                continue
            try:
                ray.get(ref)
            except Exception as e:
                bad.append(f"{refs[ref]} ({type(e).__name__})")
        return bad

    def placement_info(self) -> dict:
        """The placement table: version, shards, and the shards holding each (layer, expert)."""
        table = self.placement
        return {"version": table.version, "num_shards": table.num_shards, "moe_layers": list(table.moe_layers),
                "replicas": {f"{layer}:{e}": list(s) for (layer, e), s in sorted(table.replicas.items())}}

    def _recover(self) -> None:
        """Replaces every dead actor (all of them for a collective graph that failed) and rewires. A replacement
        can itself die before it is up, e.g. when its node was lost and the bundle is still being re-placed:
        then it goes round again."""
        everything, self._needs_restart = self._needs_restart, False
        replaced: list[str] = []
        for attempt in range(RECOVERY_ROUNDS):
            replaced += self._replace_dead(everything)
            everything = False
            try:
                self._wait_started()
                if replaced:
                    self._wire()  # new actors: new addresses (or a new process group)
                break
            except (RayActorError, GetTimeoutError) as e:
                log.warning("a replacement actor failed to start (%s); trying again", _short(e))
                time.sleep(min(2.0 * (attempt + 1), 10.0))
                # collective: the survivors may be stuck joining a group that will never complete
                everything = self.deployment.transport == "collective"
        else:
            raise RuntimeError(f"could not replace the graph's dead actors in {RECOVERY_ROUNDS} rounds")
        self.recoveries.append(", ".join(dict.fromkeys(replaced)) or "retried the step with every actor alive")
        log.warning("actor graph recovered: %s", self.recoveries[-1])

    def _replace_dead(self, everything: bool) -> list[str]:
        replaced = []
        for rank, actor in enumerate(self.attention):
            if everything or not self._alive(actor):
                ray.kill(actor, no_restart=True)
                self.attention[rank] = self._start_attention(rank)
                self._lost.update(i for i, s in self._seqs.items() if s.rank == rank)
                replaced.append(f"attention actor {rank}")
        if everything or not self._alive(self.router):
            ray.kill(self.router, no_restart=True)
            self.router = self._start_router()
            replaced.append("router")
        for s, actor in enumerate(self.shards):
            if everything or not self._alive(actor):
                ray.kill(actor, no_restart=True)
                self.shards[s] = self._start_shard(s)
                replaced.append(f"expert shard {s}")
        return replaced

    # -- lifecycle -----------------------------------------------------------------------------------
    def load_counts(self, window: bool = False) -> dict[int, list[int]]:
        """Pairs routed to each expert per MoE layer: since the start, or over the router's recent window."""
        return ray.get(self.router.load_counts.remote(window))

    def expert_health(self) -> list[dict]:
        """Busiest expert's share, max/mean load and routing entropy per MoE layer, over the recent window."""
        return ray.get(self.router.health.remote())

    def shutdown(self) -> None:
        for actor in getattr(self, "attention", []) + [getattr(self, "router", None)] + getattr(self, "shards", []):
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
        self.attention, self.router, self.shards = [], None, []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False


def _split_two(items: list) -> list[list]:
    """Two micro-batches of about equal token counts, keeping the batch's order within each."""
    total = sum(n for _, _, n, _ in items)
    first, acc = [], 0
    for item in items:
        if acc >= total / 2 and first:
            break
        first.append(item)
        acc += item[2]
    rest = items[len(first):]
    return [first, rest] if rest else [first]


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    msg = text[-1] if text else type(e).__name__
    return msg[:limit]
