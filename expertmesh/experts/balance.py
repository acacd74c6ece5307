"""How a layer's load falls on the shards under a placement: what the dashboard shows per shard, what
`/metrics` reports as balancedness, and what a rebalancer minimises.

A replicated expert's tokens are counted as split evenly over its replicas (the router deals them out in
turn, see `PlacementTable.assign`). Pure Python over ids and counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from expertmesh.experts.placement import PlacementTable


@dataclass(frozen=True, slots=True)
class ShardLoad:
    shard: int
    experts: int  # (layer, expert) replicas held, over every layer
    replicated: int  # of those, replicas of experts that have more than one
    pairs: float  # (token, expert) pairs routed to its replicas, a replicated expert's split evenly
    share: float  # pairs over every shard's pairs, in [0, 1]

    def to_dict(self) -> dict:
        return asdict(self)


def shard_loads(table: PlacementTable, counts: Mapping[int, Sequence[int]]) -> list[ShardLoad]:
    """Per shard, in shard order, from {layer: per-expert pair counts} (layers missing from `counts` count
    as idle)."""
    experts = [0] * table.num_shards
    replicated = [0] * table.num_shards
    pairs = [0.0] * table.num_shards
    for (layer, e), shards in table.replicas.items():
        count = counts[layer][e] if layer in counts else 0
        for s in shards:
            experts[s] += 1
            replicated[s] += len(shards) > 1
            pairs[s] += count / len(shards)
    total = sum(pairs)
    return [ShardLoad(s, experts[s], replicated[s], pairs[s], pairs[s] / total if total else 0.0)
            for s in range(table.num_shards)]


def layer_balancedness(table: PlacementTable, layer: int, counts: Sequence[int]) -> float:
    """Mean over the busiest shard's pairs of one layer, over the shards holding any of its experts (the
    figure vLLM and SGLang log: 1.0 is perfectly even); 1.0 for a layer that saw no token."""
    held = table.layer_shards(layer)
    load = dict.fromkeys(held, 0.0)
    for e, count in enumerate(counts):
        shards = table.replicas[layer, e]
        for s in shards:
            load[s] += count / len(shards)
    busiest = max(load.values(), default=0.0)
    return sum(load.values()) / len(load) / busiest if busiest else 1.0
