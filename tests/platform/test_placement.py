"""The expert placement table: coverage, balance, replicas, versions, lost shards."""

from collections import Counter

import pytest

from expertmesh.platform.placement import PlacementTable

LAYERS = (1, 2, 3, 5)  # MoE layers of a model whose layer 0 and 4 are dense


@pytest.mark.parametrize("num_experts,num_shards", [(16, 3), (64, 4), (7, 2), (5, 8)])
def test_balanced_covers_every_expert_once_and_evens_out_per_layer_and_in_total(num_experts, num_shards):
    table = PlacementTable.balanced(LAYERS, num_experts, num_shards)
    assert all(len(table.shards_for(layer, e)) == 1 for layer in LAYERS for e in range(num_experts))
    for layer in LAYERS:
        per_shard = Counter(table.shards_for(layer, e)[0] for e in range(num_experts))
        counts = [per_shard.get(s, 0) for s in range(num_shards)]
        assert max(counts) - min(counts) <= 1
    totals = [len(table.shard_experts(s)) for s in range(num_shards)]
    assert sum(totals) == len(LAYERS) * num_experts and max(totals) - min(totals) <= 1


def test_assignment_must_cover_every_expert_and_stay_in_range():
    full = {0: [(1, e) for e in range(3)], 1: [(1, 3)]}
    PlacementTable.from_assignment([1], 4, full)
    with pytest.raises(ValueError, match=r"1 experts are held by no shard: \(1, 3\)"):
        PlacementTable.from_assignment([1], 4, {0: [(1, e) for e in range(3)]})
    with pytest.raises(ValueError, match=r"does not have: \(2, 0\)"):
        PlacementTable.from_assignment([1], 4, {**full, 1: [(1, 3), (2, 0)]})
    with pytest.raises(ValueError, match="two replicas on one shard"):
        PlacementTable.from_assignment([1], 4, {**full, 1: [(1, 3), (1, 3)]})


def test_replicas_share_a_hot_experts_tokens_and_bump_the_version():
    table = PlacementTable.balanced([1], 4, 2)
    hot = table.with_replica(1, 0, 1)
    assert (table.version, hot.version) == (0, 1)
    assert table.shards_for(1, 0) == (0,) and hot.shards_for(1, 0) == (0, 1)
    assert hot.assign(1, [0, 0, 1, 0, 0]) == [0, 1, 1, 0, 1]
    assert table.assign(1, [0, 0, 1]) == [0, 0, 1]


def test_a_lost_shard_is_dropped_only_while_every_expert_keeps_a_replica():
    table = PlacementTable.balanced([1], 2, 2).with_replica(1, 0, 1).with_replica(1, 1, 0)
    survived = table.without_shard(1)
    assert survived.version == table.version + 1 and survived.shard_experts(1) == []
    assert survived.assign(1, [0, 1, 1]) == [0, 0, 0]
    with pytest.raises(ValueError, match="only replica"):
        PlacementTable.balanced([1], 2, 2).without_shard(0)


def test_round_trips_through_its_json_form():
    table = PlacementTable.balanced(LAYERS, 6, 3).with_replica(2, 4, 0)
    assert PlacementTable.from_dict(table.to_dict()) == table
