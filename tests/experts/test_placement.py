"""The expert placement table: coverage, balance, replicas, versions, lost shards."""

from collections import Counter

import pytest

from expertmesh.experts.placement import PlacementTable

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


def test_slots_default_to_what_each_shard_holds_and_bound_it():
    table = PlacementTable.balanced([1, 2], 5, 2)  # layer 1: shard 0 holds 3; layer 2: shard 1 holds 3
    assert table.slots == (3, 3)
    spare = PlacementTable(num_shards=2, num_experts=5, moe_layers=(1, 2), replicas=table.replicas, slots=(4, 4))
    assert spare.with_replica(1, 1, 0).slots == (4, 4)  # room in a spare slot
    assert table.with_replica(1, 1, 0).slots == (4, 3)  # no spare slot: the shard's slots grow
    with pytest.raises(ValueError, match="shard 0 has 2 slots per layer but holds 3 replicas of layer 1"):
        PlacementTable(num_shards=2, num_experts=5, moe_layers=(1, 2), replicas=table.replicas, slots=(2, 3))
    with pytest.raises(ValueError, match="slots must give 2 non-negative integers"):
        PlacementTable(num_shards=2, num_experts=5, moe_layers=(1, 2), replicas=table.replicas, slots=(3,))


def test_drained_moves_a_shards_lone_experts_to_the_shards_with_room():
    table = PlacementTable.balanced([1, 2], 6, 3).with_replica(1, 0, 1)  # expert (1, 0) on shards 0 and 1
    drained = table.drained(0)
    assert drained.version == table.version + 1
    assert drained.shard_experts(0) == [] and not drained.holds_layer(0, 1)
    assert drained.shards_for(1, 0) == (1,)  # kept its other replica, nothing new loaded for it
    for layer in (1, 2):  # every expert still held, and per layer the two shards left stay even
        per_shard = Counter(s for e in range(6) for s in drained.shards_for(layer, e))
        assert sum(per_shard.values()) == 6 and abs(per_shard[1] - per_shard[2]) <= 1
    with pytest.raises(ValueError, match="the only shard cannot be drained"):
        PlacementTable.balanced([1], 2, 1).drained(0)


def test_diff_names_what_each_shard_loads_and_drops():
    table = PlacementTable.balanced([1], 4, 2)  # shard 0: experts 0, 2; shard 1: experts 1, 3
    assert table.diff(table) == {}
    assert table.diff(table.with_replica(1, 0, 1)) == {1: ([(1, 0)], [])}
    assert table.diff(table.drained(1)) == {0: ([(1, 1), (1, 3)], []), 1: ([], [(1, 1), (1, 3)])}
