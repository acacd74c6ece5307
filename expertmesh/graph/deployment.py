"""How one model replica is laid out on Ray: the deployment config, read from a dict or a YAML file.

Everything is checked before anything starts, and each error names the field: a config that cannot work
is refused, not discovered halfway through building the actor graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from expertmesh.experts import PlacementTable
from expertmesh.experts.rebalance_policy import RebalancePolicy
from expertmesh.experts.shard_autoscale import ShardAutoscalePolicy
from expertmesh.model.config import ModelConfig
from expertmesh.transport import DataPlaneSettings
from expertmesh.transport.settings import MIB

TRANSPORTS = ("inprocess", "grpc", "collective")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True, kw_only=True, slots=True)
class ActorResources:
    """Ray resources of one actor. `resources` are custom Ray resources: a cluster whose worker groups each
    advertise one (KubeRay's `resources` of a worker group, `ray start --resources`) pins each role of the
    graph to its group, e.g. attention actors to the `gpu-attention` nodes."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.resources, dict):
            raise ValueError(f"resources must be a mapping of resource name to amount, got {self.resources!r}")
        for key, value in self.resources.items():
            if not isinstance(key, str) or not key or key in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"resources names custom Ray resources (set CPU and GPU with num_cpus and "
                                 f"num_gpus), got {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"resources[{key!r}] must be a number > 0, got {value!r}")

    def bundle(self) -> dict[str, float]:
        """This actor's placement-group bundle (empty when it asks for nothing)."""
        out = {k: v for k, v in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if v > 0}
        out.update(self.resources)
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class DeploymentConfig:
    attention_actors: int = 1
    expert_shards: int = 1
    # "balanced", or {shard: [[layer, expert], ...]} naming what each shard holds (shards from 0).
    expert_placement: str | dict[int, list[tuple[int, int]]] = "balanced"
    # "inprocess": the shards' experts run inside the router's process; "grpc": shard actors behind gRPC
    # streams; "collective": shard actors in a torch.distributed group (gloo, tensors staged on the CPU)
    transport: str = "inprocess"
    placement_strategy: str = "SPREAD"  # how the Ray placement group spreads the actors over nodes
    # 2: each attention actor splits a step's sequences into two micro-batches that ping-pong, so attention
    # of one overlaps the routed experts of the other: pays where they run on different nodes. 1: one
    # micro-batch, i.e. half the expert-weight reads per token: better where they share a node's cores.
    # "auto": 2 when no attention actor shares a node with the experts, else 1.
    micro_batches: int | str = "auto"
    attention_resources: ActorResources = field(default_factory=ActorResources)
    router_resources: ActorResources = field(default_factory=ActorResources)
    shard_resources: ActorResources = field(default_factory=ActorResources)
    ray_address: str | None = None  # None: start a local cluster (or join RAY_ADDRESS)
    # True on a cluster whose autoscaler adds nodes for a waiting placement group (KubeRay with
    # `enableInTreeAutoscaling`, `ray up`): a graph bigger than the nodes up now is not refused, and its
    # actors get `placement_timeout_s` to be placed (GPU nodes take minutes to join).
    cluster_autoscales: bool = False
    placement_timeout_s: float = 120.0
    # The longest one data-plane wait may last (a shard's answer to one layer, an attention actor's hidden
    # states): a peer slower than that is taken for stalled, replaced, and the step retried.
    data_plane_timeout_s: float = 30.0
    # The longest a control call may take: pings, load counts, a placement swap between steps.
    control_timeout_s: float = 10.0
    # The longest recovery waits for a replacement actor to be placed and started before the step fails
    # with an error (its requests get 503) and the engine goes on.
    recovery_timeout_s: float = 120.0
    max_message_mib: int = 256  # the largest data-plane message; a 2048-token fp32 prefill at H=7168 is 56 MiB
    # Elastic experts: replicas of each MoE layer every shard holds once the rebalancer has run (spare slots
    # take redundant replicas of hot experts). None: just enough for one replica of each expert.
    expert_slots_per_shard: int | None = None
    rebalance_interval_s: float | None = None  # how often the server rebalances on its own; None: on request
    rebalance_min_gain: float = 0.05  # the least fall of the busiest shard's load (as a share) worth a swap
    rebalance_min_pairs: int = 256  # the least routed pairs per layer in the load window to judge on
    # `expert_shards: {min: 1, max: 8}` in a config: the graph starts `min` shards (expert_shards) and the
    # server adds and removes them between the two by `shard_autoscaling`'s rules (ShardAutoscalePolicy's
    # fields: scale_up_above, scale_down_below, window_steps, up_cooldown_s, down_cooldown_s, interval_s)
    expert_shards_max: int | None = None
    shard_autoscaling: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("attention_actors", "expert_shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.cluster_autoscales, bool):
            raise ValueError(f"cluster_autoscales must be true or false, got {self.cluster_autoscales!r}")
        for name in ("placement_timeout_s", "data_plane_timeout_s", "control_timeout_s", "recovery_timeout_s"):
            t = getattr(self, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {t!r}")
        m = self.max_message_mib
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 2047:
            raise ValueError(f"max_message_mib must be an integer in [1, 2047] (gRPC's limit), got {m!r}")
        if self.micro_batches not in (1, 2, "auto") or isinstance(self.micro_batches, bool):
            raise ValueError(f"micro_batches must be 1, 2 or 'auto', got {self.micro_batches!r}")
        if not isinstance(self.shard_autoscaling, dict):
            raise ValueError(f"shard_autoscaling must be a mapping, got {self.shard_autoscaling!r}")
        policy = self.autoscale_policy()  # checks expert_shards' min and max and the rules
        if policy.enabled and self.transport == "collective":
            raise ValueError("expert_shards: a min and a max need transport grpc or inprocess (the collective "
                             "transport's process group has a fixed size)")
        slots = self.expert_slots_per_shard
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            raise ValueError(f"expert_slots_per_shard must be an integer >= 1 or null, got {slots!r}")
        RebalancePolicy(slots_per_shard=slots or 1, interval_s=self.rebalance_interval_s,
                        min_gain=self.rebalance_min_gain, min_pairs=self.rebalance_min_pairs)  # checks the fields
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}; got {self.transport!r}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}; got {self.placement_strategy!r}"
            )
        if isinstance(self.expert_placement, str):
            if self.expert_placement != "balanced":
                raise ValueError(f"expert_placement must be 'balanced' or a mapping of shard to experts, "
                                 f"got {self.expert_placement!r}")
        elif isinstance(self.expert_placement, dict):
            bad = [s for s in self.expert_placement if not isinstance(s, int) or not 0 <= s < self.expert_shards]
            if bad:
                raise ValueError(
                    f"expert_placement names shards {bad} outside [0, expert_shards={self.expert_shards})"
                )
        else:
            kind = type(self.expert_placement).__name__
            raise ValueError(f"expert_placement must be 'balanced' or a mapping, got {kind}")

    @property
    def shard_actors(self) -> int:
        """Expert-shard actors started: none for "inprocess", whose shards live in the router's process (size
        `router_resources` for them)."""
        return 0 if self.transport == "inprocess" else self.expert_shards

    def total_resources(self) -> dict[str, float]:
        """Ray resources the whole graph asks for: CPU, GPU and the custom ones, over every actor."""
        out: dict[str, float] = {}
        for count, r in ((self.attention_actors, self.attention_resources), (1, self.router_resources),
                         (self.shard_actors, self.shard_resources)):
            for key, value in r.bundle().items():
                out[key] = out.get(key, 0.0) + count * value
        return out

    def data_plane(self, role: str) -> DataPlaneSettings:
        """The data-plane limits of one role's actors: the router serves a stream per attention actor."""
        streams = self.attention_actors + 8 if role == "router" else 8
        return DataPlaneSettings(timeout_s=self.data_plane_timeout_s, max_message_bytes=self.max_message_mib * MIB,
                                 max_concurrent_rpcs=streams)

    @property
    def total_gpus(self) -> float:
        return self.total_resources().get("GPU", 0.0)

    @property
    def total_cpus(self) -> float:
        return self.total_resources().get("CPU", 0.0)

    def placement_for(self, model: ModelConfig) -> PlacementTable:
        """The initial placement table for a model; refused if any routed expert would have no shard."""
        moe_layers = [i for i, is_moe in enumerate(model.moe_layers) if is_moe]
        num_experts = model.routing.num_experts
        self.rebalance_policy(num_experts)  # the slots must hold every expert
        if self.expert_placement == "balanced":
            return PlacementTable.balanced(moe_layers, num_experts, self.expert_shards)
        table = PlacementTable.from_assignment(moe_layers, num_experts, self.expert_placement)
        empty = [s for s in range(self.expert_shards) if not table.shard_experts(s)]
        if empty:
            raise ValueError(f"expert_placement leaves expert shards {empty} with no experts")
        return table

    def autoscale_policy(self) -> ShardAutoscalePolicy:
        """When the server adds or removes expert shards (never, with a fixed count)."""
        known = {f.name for f in fields(ShardAutoscalePolicy)} - {"min_shards", "max_shards"}
        unknown = sorted(set(self.shard_autoscaling) - known)
        if unknown:
            raise ValueError(f"unknown shard_autoscaling fields {unknown}; known: {sorted(known)}")
        top = self.expert_shards if self.expert_shards_max is None else self.expert_shards_max
        return ShardAutoscalePolicy(min_shards=self.expert_shards, max_shards=top, **self.shard_autoscaling)

    def rebalance_policy(self, num_experts: int) -> RebalancePolicy:
        """How the server rebalances this graph's experts; refused when the slots cannot hold every expert."""
        slots = self.expert_slots_per_shard or -(-num_experts // self.expert_shards)
        if slots * self.expert_shards < num_experts:
            raise ValueError(f"expert_slots_per_shard {slots} x expert_shards {self.expert_shards} cannot hold the "
                             f"model's {num_experts} experts of each layer")
        return RebalancePolicy(slots_per_shard=slots, interval_s=self.rebalance_interval_s,
                               min_gain=self.rebalance_min_gain, min_pairs=self.rebalance_min_pairs)

    def check_cluster(self, resources: dict[str, float]) -> None:
        """Refuses a deployment the cluster cannot hold (`resources` as `ray.cluster_resources()` gives).
        An autoscaling cluster may grow: pass the resources it can reach."""
        for key, needed in sorted(self.total_resources().items()):  # CPU, GPU, then the custom ones
            have = resources.get(key, 0.0)
            if needed > have:
                what = f"{key}s" if key in ("CPU", "GPU") else f"of resource {key}"
                raise ValueError(f"the deployment needs {needed:g} {what} but the cluster has {have:g}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeploymentConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"a deployment config must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown deployment fields {unknown}; known: {sorted(known)}")
        kwargs = dict(raw)
        for name in ("attention_resources", "router_resources", "shard_resources"):
            if name in kwargs:
                kwargs[name] = _resources(name, kwargs[name])
        shards = kwargs.get("expert_shards")
        if isinstance(shards, dict):  # {min, max}: the graph starts `min` and the server scales in between
            if set(shards) - {"min", "max"} or "max" not in shards:
                raise ValueError(f"expert_shards must be an integer or a mapping {{min, max}}, got {shards!r}")
            kwargs["expert_shards"], kwargs["expert_shards_max"] = shards.get("min", 1), shards["max"]
        placement = kwargs.get("expert_placement")
        if isinstance(placement, dict):
            kwargs["expert_placement"] = _placement(placement)
        return cls(**kwargs)

    @classmethod
    def load(cls, spec: DeploymentConfig | dict | str | Path) -> DeploymentConfig:
        """From a DeploymentConfig, a mapping, or the path of a YAML file."""
        if isinstance(spec, DeploymentConfig):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, (str, Path)):
            return cls.from_yaml(spec)
        raise TypeError(f"a deployment is a dict, a YAML path or a DeploymentConfig, got {type(spec).__name__}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentConfig:
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from e
        return cls.from_dict(raw or {})


def _resources(name: str, value: Any) -> ActorResources:
    if isinstance(value, ActorResources):
        return value
    if not isinstance(value, dict) or set(value) - {"num_cpus", "num_gpus", "resources"}:
        raise ValueError(f"{name} must be a mapping with num_cpus, num_gpus and/or resources, got {value!r}")
    try:
        return ActorResources(**value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _placement(raw: dict) -> dict[int, list[tuple[int, int]]]:
    out = {}
    for shard, experts in raw.items():
        try:
            out[int(shard)] = [(int(layer), int(expert)) for layer, expert in experts]
        except (TypeError, ValueError):
            raise ValueError(
                f"expert_placement[{shard!r}] must be a list of [layer, expert] pairs, got {experts!r}"
            ) from None
    return out
