"""The expert shards' autoscaling rule: one shard more when the dispatch takes most of each step, one fewer
when it takes little, within the bounds, never twice inside a cooldown, and only on a full window."""

from __future__ import annotations

import pytest

from expertmesh.experts.shard_autoscale import ShardAutoscalePolicy

POLICY = ShardAutoscalePolicy(min_shards=2, max_shards=4, window_steps=4, up_cooldown_s=30, down_cooldown_s=120)


def steps(share: float, n: int = 4) -> list[tuple[float, float, float]]:
    return [(0.1, 0.01, 0.1 * share)] * n


def test_up_when_the_experts_take_most_of_each_step():
    assert POLICY.expert_share(steps(0.8)) == pytest.approx(0.8)
    assert POLICY.target(2, steps(0.8), since_change_s=60)[0] == 3
    assert POLICY.target(4, steps(0.8), since_change_s=60)[0] == 4  # at the maximum
    shards, why = POLICY.target(2, steps(0.8), since_change_s=10)
    assert shards == 2 and "10 s ago" in why  # inside the cooldown


def test_down_when_they_take_little_after_a_longer_cooldown():
    assert POLICY.target(3, steps(0.1), since_change_s=200)[0] == 2
    assert POLICY.target(3, steps(0.1), since_change_s=60)[0] == 3
    assert POLICY.target(2, steps(0.1), since_change_s=200)[0] == 2  # at the minimum
    assert POLICY.target(3, steps(0.4), since_change_s=200)[0] == 3  # in between: stay


def test_only_on_a_full_window_of_the_latest_steps():
    assert POLICY.target(2, steps(0.9, n=3), since_change_s=600)[0] == 2
    assert POLICY.expert_share(steps(0.1, n=10) + steps(0.9, n=4)) == pytest.approx(0.9)


@pytest.mark.parametrize("fields, says", [
    ({"min_shards": 3, "max_shards": 2}, r"expert_shards.min \(3\) is above expert_shards.max \(2\)"),
    ({"min_shards": 0, "max_shards": 2}, "expert_shards.min must be an integer >= 1"),
    ({"min_shards": 1, "max_shards": 2, "scale_up_above": 0.2, "scale_down_below": 0.3}, "must be below"),
    ({"min_shards": 1, "max_shards": 2, "interval_s": 0}, "interval_s > 0"),
    ({"min_shards": 1, "max_shards": 2, "window_steps": 0}, "shard_autoscaling.window_steps"),
])
def test_bad_rules_are_named(fields, says):
    with pytest.raises(ValueError, match=says):
        ShardAutoscalePolicy(**fields)


def test_a_target_by_hand_must_be_within_the_bounds():
    POLICY.check_target(3)
    with pytest.raises(ValueError, match=r"expert_shards must be an integer in \[2, 4\]"):
        POLICY.check_target(5)
