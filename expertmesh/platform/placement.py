"""The expert placement table: which expert shards hold a replica of each logical expert.

A logical expert is a (layer, expert) pair of the checkpoint; a replica is a copy of its weights on one
expert shard. The table is immutable and versioned: every change (a hot expert replicated, a dead shard
dropped, a rebalance) yields a new table with the next version, which the router swaps in between steps,
so a step never runs against a half-applied placement. Pure Python over ids: no torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Expert = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True, slots=True)
class PlacementTable:
    num_shards: int
    num_experts: int
    moe_layers: tuple[int, ...]
    replicas: Mapping[Expert, tuple[int, ...]]  # logical expert -> shards holding it, in order of preference
    version: int = 0

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {self.num_shards}")
        expected = {(layer, e) for layer in self.moe_layers for e in range(self.num_experts)}
        extra = sorted(set(self.replicas) - expected)
        if extra:
            raise ValueError(f"placement names experts the model does not have: {_few(extra)}")
        missing = sorted(e for e in expected if not self.replicas.get(e))
        if missing:
            raise ValueError(f"{len(missing)} experts are held by no shard: {_few(missing)}")
        for expert, shards in self.replicas.items():
            bad = [s for s in shards if not 0 <= s < self.num_shards]
            if bad:
                raise ValueError(f"expert {expert} placed on shards {bad} outside [0, {self.num_shards})")
            if len(set(shards)) != len(shards):
                raise ValueError(f"expert {expert} has two replicas on one shard: {list(shards)}")

    @classmethod
    def balanced(cls, moe_layers: Sequence[int], num_experts: int, num_shards: int) -> PlacementTable:
        """One replica per expert, dealt round-robin over the shards through all layers in order (each layer
        starts where the previous one stopped), so every shard holds the same number of experts per layer
        and in total, up to one."""
        replicas = {}
        for i, layer in enumerate(moe_layers):
            for e in range(num_experts):
                replicas[layer, e] = ((i * num_experts + e) % num_shards,)
        return cls(num_shards=num_shards, num_experts=num_experts, moe_layers=tuple(moe_layers), replicas=replicas)

    @classmethod
    def from_assignment(
        cls, moe_layers: Sequence[int], num_experts: int, assignment: Mapping[int, Iterable[Expert]]
    ) -> PlacementTable:
        """From what each shard holds: {shard: [(layer, expert), ...]} (shards numbered from 0)."""
        num_shards = max(assignment, default=-1) + 1
        held: dict[Expert, list[int]] = {}
        for shard in sorted(assignment):
            for layer, expert in assignment[shard]:
                held.setdefault((int(layer), int(expert)), []).append(shard)
        return cls(num_shards=num_shards, num_experts=num_experts, moe_layers=tuple(moe_layers),
                   replicas={k: tuple(v) for k, v in held.items()})

    def shard_experts(self, shard: int) -> list[Expert]:
        """What a shard must load, in (layer, expert) order."""
        return sorted(e for e, shards in self.replicas.items() if shard in shards)

    def holds_layer(self, shard: int, layer: int) -> bool:
        """Whether `shard` holds a replica of any expert of `layer`."""
        return any(shard in self.replicas[layer, e] for e in range(self.num_experts))

    def shards_for(self, layer: int, expert: int) -> tuple[int, ...]:
        return self.replicas[layer, expert]

    def assign(self, layer: int, expert_ids: Sequence[int]) -> list[int]:
        """The shard for each routed (token, slot) pair of `layer`, given its expert ids in order. Pairs of an
        expert with several replicas are dealt over them in turn, so a hot expert's tokens split evenly."""
        seen: dict[int, int] = {}
        out = []
        for e in expert_ids:
            shards = self.replicas[layer, e]
            n = seen.get(e, 0)
            out.append(shards[n % len(shards)])
            seen[e] = n + 1
        return out

    def with_replica(self, layer: int, expert: int, shard: int) -> PlacementTable:
        """A new version with one more replica of (layer, expert) on `shard`."""
        replicas = dict(self.replicas)
        replicas[layer, expert] = (*self.replicas[layer, expert], shard)
        return self._next(replicas)

    def without_shard(self, shard: int) -> PlacementTable:
        """A new version with a lost shard's replicas dropped; refused if an expert would have none left."""
        orphans = sorted(e for e, shards in self.replicas.items() if shards == (shard,))
        if orphans:
            raise ValueError(f"shard {shard} holds the only replica of {len(orphans)} experts: {_few(orphans)}")
        return self._next({e: tuple(s for s in shards if s != shard) for e, shards in self.replicas.items()})

    def _next(self, replicas: Mapping[Expert, tuple[int, ...]]) -> PlacementTable:
        return PlacementTable(num_shards=self.num_shards, num_experts=self.num_experts, moe_layers=self.moe_layers,
                              replicas=replicas, version=self.version + 1)

    def to_dict(self) -> dict:
        """JSON-able form, for shipping the table to actors."""
        replicas = [[layer, e, list(s)] for (layer, e), s in sorted(self.replicas.items())]
        return {"num_shards": self.num_shards, "num_experts": self.num_experts, "moe_layers": list(self.moe_layers),
                "version": self.version, "replicas": replicas}

    @classmethod
    def from_dict(cls, d: dict) -> PlacementTable:
        return cls(num_shards=d["num_shards"], num_experts=d["num_experts"], moe_layers=tuple(d["moe_layers"]),
                   version=d["version"], replicas={(layer, e): tuple(s) for layer, e, s in d["replicas"]})


def _few(items: list, n: int = 5) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f" ... ({len(items) - n} more)" if len(items) > n else "")
