"""The expert placement table: which expert shards hold a replica of each logical expert.

A logical expert is a (layer, expert) pair of the checkpoint; a replica is a copy of its weights on one
expert shard. Each shard has a number of slots per MoE layer: the most replicas of that layer it may hold
(what a rebalancer packs into). The table is immutable and versioned: every change (a hot expert
replicated, a shard drained, a rebalance) yields a new table with the next version, which the router and
the shards swap in between steps, so a step never runs against a half-applied placement. Pure Python
over ids: no torch, no Ray.
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
    # slots[s]: the most replicas of one MoE layer shard s may hold. Empty: each shard's largest per-layer
    # count in this table (no spare slot).
    slots: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {self.num_shards}")
        if self.version < 0:
            raise ValueError(f"version must be >= 0, got {self.version}")
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
        held = self._per_layer_counts()
        if not self.slots:
            object.__setattr__(self, "slots", tuple(max((held[s].values()), default=0) for s in range(self.num_shards)))
        if len(self.slots) != self.num_shards or any(not isinstance(n, int) or n < 0 for n in self.slots):
            raise ValueError(f"slots must give {self.num_shards} non-negative integers (one per shard), "
                             f"got {list(self.slots)}")
        for s in range(self.num_shards):
            over = sorted(layer for layer, n in held[s].items() if n > self.slots[s])
            if over:
                raise ValueError(f"shard {s} has {self.slots[s]} slots per layer but holds "
                                 f"{held[s][over[0]]} replicas of layer {over[0]}")

    def _per_layer_counts(self) -> list[dict[int, int]]:
        """[shard] -> {layer: replicas of that layer held}."""
        held: list[dict[int, int]] = [{} for _ in range(self.num_shards)]
        for (layer, _), shards in self.replicas.items():
            for s in shards:
                if 0 <= s < self.num_shards:
                    held[s][layer] = held[s].get(layer, 0) + 1
        return held

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
        cls, moe_layers: Sequence[int], num_experts: int, assignment: Mapping[int, Iterable[Expert]],
        *, num_shards: int | None = None,
    ) -> PlacementTable:
        """From what each shard holds: {shard: [(layer, expert), ...]} (shards numbered from 0; shards
        up to `num_shards` that the mapping leaves out hold nothing)."""
        if num_shards is None:
            num_shards = max(assignment, default=-1) + 1
        held: dict[Expert, list[int]] = {}
        for shard in sorted(assignment):
            for layer, expert in assignment[shard]:
                held.setdefault((int(layer), int(expert)), []).append(shard)
        return cls(num_shards=num_shards, num_experts=num_experts, moe_layers=tuple(moe_layers),
                   replicas={k: tuple(v) for k, v in held.items()})

    def check_fits(self, moe_layers: Sequence[int], num_experts: int) -> None:
        """Refuses a table made for another model (other MoE layers or expert count)."""
        if tuple(self.moe_layers) != tuple(moe_layers) or self.num_experts != num_experts:
            raise ValueError(f"placement table is for MoE layers {list(self.moe_layers)} x {self.num_experts} "
                             f"experts; this model has {list(moe_layers)} x {num_experts}")

    def shard_experts(self, shard: int) -> list[Expert]:
        """What a shard must load, in (layer, expert) order."""
        return sorted(e for e, shards in self.replicas.items() if shard in shards)

    def holds_layer(self, shard: int, layer: int) -> bool:
        """Whether `shard` holds a replica of any expert of `layer`."""
        return any(shard in self.replicas[layer, e] for e in range(self.num_experts))

    def layer_shards(self, layer: int) -> list[int]:
        """The shards holding any replica of `layer`'s experts, in order."""
        return sorted({s for e in range(self.num_experts) for s in self.replicas[layer, e]})

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
        """A new version with one more replica of (layer, expert) on `shard` (its slots grow if full)."""
        replicas = dict(self.replicas)
        replicas[layer, expert] = (*self.replicas[layer, expert], shard)
        held = sum(1 for (lay, _), shards in replicas.items() if lay == layer and shard in shards)
        slots = tuple(max(n, held) if s == shard else n for s, n in enumerate(self.slots))
        return self._next(replicas, slots)

    def without_shard(self, shard: int) -> PlacementTable:
        """A new version with a shard's replicas dropped; refused if an expert would have none left."""
        orphans = sorted(e for e, shards in self.replicas.items() if shards == (shard,))
        if orphans:
            raise ValueError(f"shard {shard} holds the only replica of {len(orphans)} experts: {_few(orphans)}")
        return self._next({e: tuple(s for s in shards if s != shard) for e, shards in self.replicas.items()})

    def drained(self, shard: int) -> PlacementTable:
        """A new version in which `shard` holds nothing: each expert it alone held moves to the shard holding
        the fewest of its layer among those with a free slot there (among all others when none has one, whose
        slots then grow). Shards keep their numbers."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} is outside [0, {self.num_shards})")
        others = [s for s in range(self.num_shards) if s != shard]
        if not others:
            raise ValueError("the only shard cannot be drained")
        held = self._per_layer_counts()
        replicas = {e: tuple(s for s in shards if s != shard) for e, shards in self.replicas.items()}
        slots = list(self.slots)
        for (layer, e), shards in sorted(replicas.items()):
            if shards:
                continue
            target = max(others, key=lambda s: (slots[s] > held[s].get(layer, 0), -held[s].get(layer, 0), -s))
            held[target][layer] = held[target].get(layer, 0) + 1
            slots[target] = max(slots[target], held[target][layer])  # grows only when every shard is full
            replicas[layer, e] = (target,)
        return self._next(replicas, tuple(slots))

    def diff(self, new: PlacementTable) -> dict[int, tuple[list[Expert], list[Expert]]]:
        """{shard: (experts it must load, experts it may drop)} to go from this table to `new`, for every
        shard of either table whose holding changes."""
        out = {}
        for s in range(max(self.num_shards, new.num_shards)):
            before = set(self.shard_experts(s)) if s < self.num_shards else set()
            after = set(new.shard_experts(s)) if s < new.num_shards else set()
            if before != after:
                out[s] = (sorted(after - before), sorted(before - after))
        return out

    def _next(self, replicas: Mapping[Expert, tuple[int, ...]], slots: tuple[int, ...] | None = None) -> PlacementTable:
        return PlacementTable(num_shards=self.num_shards, num_experts=self.num_experts, moe_layers=self.moe_layers,
                              replicas=replicas, version=self.version + 1,
                              slots=self.slots if slots is None else slots)

    def to_dict(self) -> dict:
        """JSON-able form, for shipping the table to actors."""
        replicas = [[layer, e, list(s)] for (layer, e), s in sorted(self.replicas.items())]
        return {"num_shards": self.num_shards, "num_experts": self.num_experts, "moe_layers": list(self.moe_layers),
                "version": self.version, "slots": list(self.slots), "replicas": replicas}

    @classmethod
    def from_dict(cls, d: dict) -> PlacementTable:
        return cls(num_shards=d["num_shards"], num_experts=d["num_experts"], moe_layers=tuple(d["moe_layers"]),
                   version=d["version"], slots=tuple(d.get("slots", ())),
                   replicas={(layer, e): tuple(s) for layer, e, s in d["replicas"]})


def _few(items: list, n: int = 5) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f" ... ({len(items) - n} more)" if len(items) > n else "")
