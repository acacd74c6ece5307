"""When the live controller takes a proposed placement: the worst layer's busiest shard over the mean, before
and after, on the load window; the minimum gain, the minimum load, and `force`."""

from __future__ import annotations

import pytest

from expertmesh.experts import PlacementTable
from expertmesh.experts.rebalance_policy import RebalancePolicy, worst_imbalance

LAYERS = (1, 2)


def table(replicas: dict) -> PlacementTable:
    return PlacementTable(num_shards=2, num_experts=4, moe_layers=LAYERS, replicas=replicas)


# layer 1's experts 0 and 1 take most tokens: together on shard 0 (skewed), or one on each shard (even)
SKEWED = table({(layer, e): ((0,) if e < 2 else (1,)) for layer in LAYERS for e in range(4)})
EVEN = table({(layer, e): ((0,) if e % 2 == 0 else (1,)) for layer in LAYERS for e in range(4)})
LOAD = {1: [400, 400, 100, 100], 2: [250, 250, 250, 250]}


def test_the_figure_is_the_worst_layers_busiest_shard_over_the_mean():
    assert worst_imbalance(SKEWED, LOAD) == pytest.approx(800 / 500)
    assert worst_imbalance(EVEN, LOAD) == pytest.approx(1.0)


def test_a_proposal_is_taken_only_past_the_minimum_gain_and_load():
    policy = RebalancePolicy(slots_per_shard=2, min_gain=0.3, min_pairs=100)
    verdict = policy.judge(SKEWED, EVEN, LOAD)
    assert verdict.worth_it and verdict.gain == pytest.approx(1 - 1 / 1.6)
    assert not RebalancePolicy(slots_per_shard=2, min_gain=0.5).judge(SKEWED, EVEN, LOAD).worth_it
    quiet = {1: [4, 4, 1, 1], 2: [2, 2, 2, 2]}
    verdict = policy.judge(SKEWED, EVEN, quiet)
    assert not verdict.worth_it and "8 pairs" in verdict.reason
    assert policy.judge(SKEWED, EVEN, quiet, force=True).worth_it  # asked for: the window's size is not judged
    assert not policy.judge(EVEN, SKEWED, LOAD, force=True).worth_it  # but never a worse placement


@pytest.mark.parametrize("fields, says", [
    ({"slots_per_shard": 0}, "expert_slots_per_shard must be an integer >= 1"),
    ({"slots_per_shard": 2, "interval_s": 0}, "rebalance_interval_s must be a number of seconds > 0"),
    ({"slots_per_shard": 2, "min_gain": 1.0}, r"rebalance_min_gain must be in \[0, 1\)"),
    ({"slots_per_shard": 2, "min_pairs": -1}, "rebalance_min_pairs must be an integer >= 0"),
])
def test_bad_settings_are_named(fields, says):
    with pytest.raises(ValueError, match=says):
        RebalancePolicy(**fields)
