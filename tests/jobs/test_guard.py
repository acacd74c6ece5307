"""The imbalance guard on load sequences with a known verdict: quiet on the base model's own spread, a
warning once a layer passes the first line, the learning rate lowered (cooldown apart, a bounded number of
times) past the second, and a stop past the third or when lowering is used up."""

import pytest

from expertmesh.experts import layer_health
from expertmesh.jobs.finetune.config import GuardConfig
from expertmesh.jobs.finetune.guard import ImbalanceGuard

E, TOP_K = 8, 2
EVEN = [100] * E  # the base's spread: max/mean 1.0, entropy 1.0


def skewed(max_over_mean: float) -> list[int]:
    """Counts over E experts whose busiest is `max_over_mean` times the mean (the rest share what is left)."""
    total = 100 * E
    busiest = round(max_over_mean * total / E)
    rest = (total - busiest) // (E - 1)
    return [busiest] + [rest] * (E - 1)


def guard(**config) -> ImbalanceGuard:
    base = {1: layer_health(1, EVEN, TOP_K), 2: layer_health(2, EVEN, TOP_K)}
    return ImbalanceGuard(GuardConfig(**config), base)


def test_quiet_on_the_base_spread_and_on_mild_drift():
    g = guard()
    for step in range(50):
        assert g.observe(step, {1: EVEN, 2: skewed(1.3)}, TOP_K, overlap={1: 0.9, 2: 0.7}) == []
    assert not g.stopped and g.lr_drops == 0


def test_a_warning_once_when_a_layer_passes_the_first_line():
    g = guard()
    (event,) = g.observe(1, {1: skewed(1.7), 2: EVEN}, TOP_K)
    assert (event.layer, event.metric, event.action) == (1, "max_over_mean", "warn")
    assert event.value == pytest.approx(1.7, abs=0.01) and event.threshold == pytest.approx(1.5)
    assert g.observe(2, {1: skewed(1.7), 2: EVEN}, TOP_K) == []  # still past it: no repeat
    g.observe(3, {1: EVEN, 2: EVEN}, TOP_K)
    assert [e.action for e in g.observe(4, {1: skewed(1.7), 2: EVEN}, TOP_K)] == ["warn"]  # back again


def test_lowered_cooldown_apart_then_stopped_when_lowering_is_used_up():
    g = guard(max_lr_drops=2, cooldown_steps=5)
    actions = {}
    for step in range(20):
        for e in g.observe(step, {1: skewed(2.4), 2: EVEN}, TOP_K):
            actions.setdefault(step, []).append(e.action)
        if g.stopped:
            break
    # warn and lower at once (it passed both lines), lower again after the cooldown, then stop
    assert actions == {0: ["warn", "lower_lr"], 5: ["lower_lr"], 10: ["stop"]}
    assert g.lr_drops == 2 and g.stopped
    assert [e.to_dict()["action"] for e in g.events] == ["warn", "lower_lr", "lower_lr", "stop"]
    with pytest.raises(RuntimeError, match="stopped"):
        g.observe(11, {1: EVEN}, TOP_K)


def test_past_the_last_line_stops_at_once():
    g = guard()
    events = g.observe(3, {1: EVEN, 2: skewed(4.0)}, TOP_K)
    assert events[-1].layer == 2 and events[-1].action == "stop" and events[-1].threshold == pytest.approx(3.0)
    assert {e.action for e in events[:-1]} == {"warn"} and g.stopped


def test_routing_drift_and_entropy_collapse_are_caught_too():
    g = guard()
    events = g.observe(1, {1: EVEN, 2: EVEN}, TOP_K, overlap={1: 0.45, 2: 0.9})
    assert [(e.layer, e.metric, e.action) for e in events] == [(1, "overlap", "warn")]
    collapsed = [1000] + [1] * (E - 1)  # nearly every token on one expert: entropy far below the base's
    events = g.observe(2, {1: EVEN, 2: collapsed}, TOP_K)
    assert events[-1].action == "stop" and g.stopped
    assert {(e.metric, e.action) for e in events[:-1]} == {("max_over_mean", "warn"), ("entropy", "warn")}


def test_counts_of_a_layer_without_base_figures_are_refused():
    with pytest.raises(ValueError, match=r"MoE layers \[7\]"):
        guard().observe(0, {7: EVEN}, TOP_K)
