"""The load each shard takes under a placement, and per-layer balancedness (mean over max shard load)."""

import pytest

from expertmesh.experts import PlacementTable, layer_balancedness, shard_loads


def test_a_replicated_experts_pairs_split_evenly_over_its_replicas():
    table = PlacementTable.balanced([1], 4, 2).with_replica(1, 0, 1)  # shard 0: 0, 2; shard 1: 1, 3 and 0
    loads = shard_loads(table, {1: [8, 2, 4, 6]})
    assert [(s.shard, s.experts, s.replicated) for s in loads] == [(0, 2, 1), (1, 3, 1)]
    assert [s.pairs for s in loads] == [4 + 4, 4 + 2 + 6]
    assert [s.share for s in loads] == pytest.approx([8 / 20, 12 / 20])
    assert [s.share for s in shard_loads(table, {})] == [0.0, 0.0]


def test_balancedness_is_mean_over_max_of_the_shards_holding_the_layer():
    table = PlacementTable.balanced([1], 4, 2)
    assert layer_balancedness(table, 1, [8, 2, 4, 6]) == pytest.approx(10 / 12)  # shards 12 and 8
    assert layer_balancedness(table, 1, [0, 0, 0, 0]) == 1.0
    hot = PlacementTable.from_assignment([1], 2, {0: [(1, 0)], 1: [(1, 0), (1, 1)]})
    assert layer_balancedness(hot, 1, [10, 0]) == 1.0  # the hot expert's pairs dealt to both shards
