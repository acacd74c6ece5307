"""The actor graph as the engine's executor: one model replica on Ray actors.

`ActorGraph(deployment)` is the executor factory the engine is handed; it builds an `ActorGraphExecutor`,
which starts every actor in a placement group of its own (`builder.py`), wires the data plane
(`wiring.py`), and per step plans the work (`planning.py`) and makes one Ray call per actor. When a step
fails it replaces what died or stalled (`recovery.py`) and retries. Between steps it swaps in a new expert
placement (`placement_swap.py`).
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from expertmesh.actors import ExpertShardActor
from expertmesh.engine.executor import ExecutorSpec, ExecutorUnavailable
from expertmesh.engine.scheduler import ScheduledBatch
from expertmesh.experts import PlacementTable
from expertmesh.graph.builder import GraphBuilder, Member, label
from expertmesh.graph.deployment import DeploymentConfig
from expertmesh.graph.placement_swap import PlacementSwap
from expertmesh.graph.planning import Homes, PlannedStep, assemble, collective_slots, plan_step
from expertmesh.graph.recovery import Recovery, RecoveryFailed, ping_all
from expertmesh.graph.runtime import connect, disconnect, ray
from expertmesh.graph.wiring import wire
from expertmesh.model.config import ModelConfig
from expertmesh.transport import PeerFault
from expertmesh.transport.auth import new_secret

log = logging.getLogger(__name__)

ABORT_GRACE_S = 30.0  # how long a failed step's other calls get to return once told to abort


class StepFailed(RuntimeError):
    """A step did not complete; `suspects` are the actors that stalled or answered wrongly (still alive as
    far as Ray can tell, but to be replaced)."""

    def __init__(self, message: str, suspects: set[tuple[str, int]]):
        super().__init__(message)
        self.suspects = suspects


class ActorGraph:
    """An executor factory: `LLM(model, executor=ActorGraph({"expert_shards": 2, "transport": "grpc"}))`.

    `deployment` is a DeploymentConfig, a dict or a YAML path. `shard_class` is the Ray actor class run for
    each expert shard (a subclass of ExpertShardActor, for instance one that injects faults in tests)."""

    def __init__(self, deployment: DeploymentConfig | dict | str | Path, *, shard_class: type = ExpertShardActor):
        self.deployment = DeploymentConfig.load(deployment)
        self.shard_class = shard_class

    def __call__(self, spec: ExecutorSpec) -> ActorGraphExecutor:
        if spec.device != "cpu":
            raise ValueError("with a deployment, each actor picks its own device (the GPU Ray gives it): leave "
                             "device='cpu'")
        return ActorGraphExecutor(spec, self.deployment, shard_class=self.shard_class)


class ActorGraphExecutor:
    def __init__(self, spec: ExecutorSpec, deployment: DeploymentConfig, *, max_retries: int = 3,
                 shard_class: type = ExpertShardActor):
        self.deployment, self.max_retries = deployment, max_retries
        self.device = torch.device("cpu")  # logits come back to the driver's CPU
        self.mode = f"actor graph ({deployment.transport})"
        model_config = ModelConfig.from_pretrained(spec.model)
        self.placement: PlacementTable = deployment.placement_for(model_config)  # refused if experts are left out
        self.rebalance_policy = deployment.rebalance_policy(model_config.routing.num_experts)
        self.autoscale_policy = deployment.autoscale_policy()
        self.moe_layers = list(self.placement.moe_layers)
        self.recoveries: list[str] = []  # what recovery did, for operators and tests
        self.calls_per_step: deque[int] = deque(maxlen=1024)  # Ray calls per step (per-layer traffic is not Ray's)
        self._next_step = 1
        self.homes = Homes(deployment.attention_actors)  # which attention actor holds each sequence
        self.attention_members: list[Member] = []
        self.router_member: Member | None = None
        self.shard_members: list[Member] = []
        self.builder = GraphBuilder(spec.model, deployment, dtype=spec.dtype, num_blocks=spec.num_blocks,
                                    block_size=spec.block_size, secret=new_secret(), shard_class=shard_class,
                                    max_loras=spec.max_loras, max_lora_rank=spec.max_lora_rank,
                                    quantization=spec.quantization, kv_cache_dtype=spec.kv_cache_dtype,
                                    activation_dtype=spec.activation_dtype)
        if spec.max_loras and deployment.transport == "collective":
            raise ValueError("LoRA adapters in the actor graph need transport grpc or inprocess: the collective "
                             "transport's messages carry no adapter slots")
        self.recovery = Recovery(self)
        self.swap = PlacementSwap(self)
        self._owns_ray = connect(deployment.ray_address, num_cpus=deployment.total_cpus)
        try:
            if not deployment.cluster_autoscales:
                deployment.check_cluster(ray.cluster_resources())
            self._start_all()
        except BaseException:
            self.shutdown()
            raise

    # -- the graph's actors --------------------------------------------------------------------------
    @property
    def attention(self) -> list:
        return [m.handle for m in self.attention_members]

    @property
    def router(self):
        return self.router_member.handle

    @property
    def shards(self) -> list:
        return [m.handle for m in self.shard_members]

    def members(self) -> list[Member]:
        return [*self.attention_members, *([self.router_member] if self.router_member else []), *self.shard_members]

    def _start_all(self) -> None:
        d, b = self.deployment, self.builder
        for rank in range(d.attention_actors):
            self.attention_members.append(b.start_attention(rank, self.members()))
        self.router_member = b.start_router(self.placement, self.members())
        for s in range(d.shard_actors):
            self.shard_members.append(b.start_shard(s, self.placement, self.members()))
        b.wait_ready(self.members(), d.placement_timeout_s, "the deployment could not start")
        self.settle_micro_batches()
        self.wire()

    def settle_micro_batches(self) -> None:
        """Ping-pong of two micro-batches pays only where attention and experts use different cores."""
        self.micro_batches = self.deployment.micro_batches
        if self.micro_batches == "auto":
            attention_nodes = {m.node_id for m in self.attention_members}
            expert_nodes = {m.node_id for m in (self.shard_members or [self.router_member])}
            self.micro_batches = 1 if attention_nodes & expert_nodes else 2

    def wire(self) -> None:
        # a part of recovery (a gloo group waits for every member to join): it gets recovery's time
        wire(self.deployment.transport, self.attention_members, self.router_member, self.shard_members,
             first_step=self._next_step, timeout_s=self.deployment.recovery_timeout_s)

    # -- a step --------------------------------------------------------------------------------------
    def execute(self, batch: ScheduledBatch, *, all_logits: bool = False) -> torch.Tensor:
        self.homes.forget_finished()
        self.swap.commit_if_ready()
        if self.recovery.pending:  # an earlier recovery gave up, or a swap left actors behind: mend first
            self.recovery.run(set())
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            planned = plan_step(batch, self.homes, micro_batches=self.micro_batches, all_logits=all_logits)
            step, self._next_step = self._next_step, self._next_step + 1
            try:
                results = self._run(step, planned)
            except StepFailed as e:
                last = e
                log.warning("actor-graph step failed (attempt %d): %s", attempt + 1, e)
                self.recovery.run(e.suspects)
                continue
            self.homes.recomputed(s.seq_id for s in batch.seqs)
            return torch.from_numpy(assemble(results, planned))
        raise RuntimeError(f"the step failed {self.max_retries + 1} times; last error: {last}")

    def _run(self, step: int, planned: PlannedStep) -> dict[int, list]:
        calls: dict = {self.router.step.remote(step, planned.router_plan, planned.router_slots): ("router", 0)}
        for rank, mbs in planned.inputs.items():
            calls[self.attention_members[rank].handle.execute.remote(step, mbs)] = ("attention", rank)
        if self.deployment.transport == "collective":
            for m in self.shard_members:
                slots = collective_slots(self.placement, m.index, planned.active_micro_batches)
                calls[m.handle.serve_step.remote(slots)] = ("shard", m.index)
        self.calls_per_step.append(len(calls))
        pending = list(calls)
        results: dict[int, list] = {}
        backstop = self.deployment.data_plane_timeout_s * (2 * len(self.moe_layers) + 4)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=backstop)
            if not done:
                still = ", ".join(label(*calls[r]) for r in pending)
                self._abort(step, pending, f"no answer within {backstop:g} s")
                raise StepFailed(f"step {step}: no actor finished within {backstop:g} s (still running: {still})",
                                 set())
            role, who = calls[done[0]]
            try:
                value = ray.get(done[0])
            except Exception as e:  # an actor died, or raised: abort the others' waits, then fail the step
                reason = f"{label(role, who)} failed: {_short(e)}"
                suspects = _suspects(e) | self._abort(step, pending, reason)
                raise StepFailed(f"step {step}: {reason}", suspects) from e
            if role == "attention":
                results[who] = value
        return results

    def _abort(self, step: int, pending: list, reason: str) -> set[tuple[str, int]]:
        """Tells everyone waiting on the data plane that the step is over; returns the suspects named by the
        calls that then fail."""
        if self.deployment.transport == "collective":
            # a receive blocked in torch.distributed cannot be interrupted: the whole graph is restarted
            for m in self.members():
                ray.kill(m.handle, no_restart=True)
            self.recovery.restart_all = True
        else:
            for m in [self.router_member, *self.attention_members]:
                m.handle.abort.remote(step, reason)
        suspects: set[tuple[str, int]] = set()
        if pending:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=ABORT_GRACE_S)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - collecting who is to blame
                    suspects |= _suspects(e)
        return suspects

    # -- what the server asks ------------------------------------------------------------------------
    def load_counts(self, window: bool = False) -> dict[int, list[int]]:
        """Pairs routed to each expert per MoE layer: since the start, or over the router's recent window."""
        return self._control(self.router.load_counts.remote(window), "the router's load counts")

    def health(self) -> list[str]:
        """The actors that do not answer a ping within the control timeout (all pinged at once)."""
        members = self.members()
        answers = ping_all(members, self.deployment.control_timeout_s)
        bad = [f"{m.label} (no answer)" for i, m in enumerate(members) if answers[i] is None]
        if self.recovery.pending:
            bad.append(f"recovery has not finished: {self.recovery.pending}")
        return bad

    def _control(self, ref, what: str):
        try:
            return ray.get(ref, timeout=self.deployment.control_timeout_s)
        except GetTimeoutError:
            raise ExecutorUnavailable(f"{what}: no answer within {self.deployment.control_timeout_s:g} s") from None
        except RayActorError as e:
            raise ExecutorUnavailable(f"{what}: the actor is gone ({_short(e)}); recovery replaces it") from None

    def set_placement(self, table: PlacementTable, *, wait: bool = True,
                      timeout_s: float | None = None) -> PlacementTable:
        """Swaps in a new expert placement between steps, while requests go on (see `placement_swap.py`);
        returns it with the version it takes effect under. A table with more shards than run starts the
        missing ones (each loading its part of the table as it starts) while the running shards load theirs;
        this call returns once the new shards are connected."""
        most = self.autoscale_policy.max_shards
        if table.num_shards > most:
            raise ValueError(f"the placement has {table.num_shards} shards; this deployment runs at most {most} "
                             "(expert_shards, or its max)")
        running = self.running_shards()
        joining = None
        if running is not None and table.num_shards > running:
            joining = lambda t: self.add_expert_shards(t.num_shards - running, t)  # noqa: E731
        return self.swap.start(table, wait=wait, timeout_s=timeout_s, joining=joining)

    # -- LoRA adapters -------------------------------------------------------------------------------
    def load_adapter(self, slot: int, path: str) -> None:
        """Puts a peft adapter into `slot` on every actor: attention, shared-expert and dense-layer LoRA on the
        attention actors, each routed expert's on the shards that hold it (read there by name). ValueError
        naming what does not fit, and the slot is then emptied everywhere. An actor that dies meanwhile is
        replaced by recovery, and its replacement loads the graph's adapters as it starts."""
        if not self.builder.max_loras:
            raise ValueError("this actor graph serves no LoRA adapters: create the engine with enable_lora=True")
        if not 0 <= slot < self.builder.max_loras:
            raise ValueError(f"adapter slot {slot} is outside [0, {self.builder.max_loras})")
        self.builder.adapters[slot] = path
        error = self._on_adapter_holders("load_adapter", slot, path)
        if error is not None:
            self.builder.adapters.pop(slot, None)
            self._on_adapter_holders("clear_adapter", slot)
            raise ValueError(error)

    def _on_adapter_holders(self, method: str, *args) -> str | None:
        """Calls `method` on every actor that holds adapter weights; the first ValueError's message, if any.
        A dead actor is left to recovery (its replacement starts with the builder's adapters)."""
        holders = [*self.attention_members, *self.shard_members]
        if self.deployment.transport == "inprocess":
            holders.append(self.router_member)
        refs = [getattr(m.handle, method).remote(*args) for m in holders]
        error = None
        for ref in refs:
            try:
                ray.get(ref, timeout=self.deployment.control_timeout_s)
            except RayTaskError as e:
                if error is None and isinstance(e.cause, ValueError):
                    error = str(e.cause)
                elif not isinstance(e.cause, ValueError):
                    raise
            except (RayActorError, GetTimeoutError) as e:
                log.warning("%s did not reach an actor (recovery will replace it): %s", method, _short(e))
        return error

    def running_shards(self) -> int | None:
        """How many expert-shard actors run (None for "inprocess", whose shards live in the router and come
        and go with the placement)."""
        return None if self.deployment.transport == "inprocess" else len(self.shard_members)

    def add_expert_shards(self, count: int, table: PlacementTable | None = None) -> None:
        """Starts `count` more expert shards (each in its own placement group, holding its part of `table`,
        or nothing) and connects the router to them; steps go on meanwhile, and a placement with more shards
        can then be swapped in (`set_placement` of such a table calls this itself). A shard no node can take waits for one (the Ray autoscaler's, on a cluster that grows)
        for `placement_timeout_s`; TimeoutError naming it past that, and nothing is left started."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if self.deployment.transport == "collective":
            raise ValueError("over the collective transport the number of expert shards is fixed (its process "
                             "group is); use grpc or inprocess to scale them")
        if self.deployment.transport == "inprocess":
            return  # the router makes a hosted shard when a placement first gives it experts
        first = len(self.shard_members)
        fresh = [self.builder.start_shard(first + i, table or self.placement, self.members()) for i in range(count)]
        try:
            self.builder.wait_ready(fresh, self.deployment.placement_timeout_s, "more expert shards")
            addresses = ray.get([m.handle.serve_grpc.remote() for m in fresh],
                                timeout=self.deployment.control_timeout_s)
            ray.get(self.router.add_shards.remote({m.index: a for m, a in zip(fresh, addresses)}),
                    timeout=self.deployment.control_timeout_s)
        except BaseException:
            for m in fresh:
                self.builder.stop(m)
            raise
        self.shard_members.extend(fresh)

    def retire_shards(self, shards: list[int]) -> None:
        """Between steps, once a placement without them is in force: ends shards the placement no longer
        names."""
        try:
            ray.get(self.router.remove_shards.remote(shards), timeout=self.deployment.control_timeout_s)
        except Exception as e:  # noqa: BLE001 - the router's stale connections are harmless; the actors still go
            log.warning("the router did not forget retired shards %s: %s", shards, e)
        for m in [m for m in self.shard_members if m.index in shards]:
            self.builder.stop(m)
            self.shard_members.remove(m)

    def expert_step_timings(self, clear: bool = False) -> list[tuple[float, float, float]]:
        return self._control(self.router.step_timings.remote(clear), "the router's step timings")

    def placement_pending(self) -> int | None:
        return self.swap.pending_version

    def placement_swaps(self) -> list[dict]:
        return list(self.swap.history)

    # -- lifecycle -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        for m in self.members():
            self.builder.stop(m)
        self.attention_members, self.router_member, self.shard_members = [], None, []
        disconnect(self._owns_ray)
        self._owns_ray = False


def _suspects(e: BaseException) -> set[tuple[str, int]]:
    """The peer a failed call blamed: a PeerFault raised inside the actor reaches us as its RayTaskError."""
    cause = e.cause if isinstance(e, RayTaskError) else e
    return {(cause.role, cause.index)} if isinstance(cause, PeerFault) else set()


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    msg = text[-1] if text else type(e).__name__
    return msg[:limit]


__all__ = ["ActorGraph", "ActorGraphExecutor", "RecoveryFailed", "StepFailed"]
