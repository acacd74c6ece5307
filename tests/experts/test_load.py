"""Per-expert load: totals since the start, a sliding window of finished steps, and refusals of bad counts."""

import numpy as np
import pytest

from expertmesh.experts import ExpertLoad


def test_totals_include_the_step_under_way_and_the_window_only_finished_steps():
    load = ExpertLoad([3, 1], 4, window_steps=2)
    assert load.moe_layers == [1, 3]
    load.add(1, [1, 0, 2, 0])
    assert load.counts() == {1: [1, 0, 2, 0], 3: [0, 0, 0, 0]}
    assert load.counts(window=True) == {1: [0] * 4, 3: [0] * 4}
    load.finish_step()
    load.add(3, np.array([0, 5, 0, 0]))
    load.finish_step()
    load.add(1, [0, 0, 0, 7])
    load.finish_step()  # the first step leaves the two-step window
    assert load.counts(window=True) == {1: [0, 0, 0, 7], 3: [0, 5, 0, 0]}
    assert load.counts() == {1: [1, 0, 2, 7], 3: [0, 5, 0, 0]}
    assert load.array(window=True).tolist() == [[0, 0, 0, 7], [0, 5, 0, 0]]


def test_window_sum_equals_the_sum_of_its_steps_over_many_steps():
    rng = np.random.default_rng(0)
    load = ExpertLoad([0], 8, window_steps=5)
    steps = []
    for _ in range(40):
        counts = rng.integers(0, 9, 8)
        steps.append(counts)
        load.add(0, counts)
        load.finish_step()
    assert load.counts(window=True)[0] == np.sum(steps[-5:], axis=0).tolist()
    assert load.counts()[0] == np.sum(steps, axis=0).tolist()


@pytest.mark.parametrize("layer,counts,needle", [
    (2, [0, 0], "layer 2 is not a MoE layer here; MoE layers are \\[0\\]"),
    (0, [0, 0, 0], "must be 2 non-negative integers, got shape \\[3\\]"),
    (0, [1, -1], "non-negative"),
])
def test_bad_counts_are_refused_naming_the_layer(layer, counts, needle):
    with pytest.raises(ValueError, match=needle):
        ExpertLoad([0], 2).add(layer, counts)


def test_a_whole_steps_counts_at_once_add_as_each_layers_would():
    by_layer, at_once = ExpertLoad([3, 1], 3), ExpertLoad([3, 1], 3)
    by_layer.add(1, [1, 0, 2])
    by_layer.add(3, [0, 4, 0])
    at_once.add_all(np.array([[1, 0, 2], [0, 4, 0]]))  # rows in moe_layers order: 1, then 3
    assert at_once.counts() == by_layer.counts() == {1: [1, 0, 2], 3: [0, 4, 0]}
    with pytest.raises(ValueError, match=r"must be \[2, 3\] non-negative integers .*got shape \[3\]"):
        at_once.add_all(np.array([1, 0, 2]))
    with pytest.raises(ValueError, match="non-negative"):
        at_once.add_all(np.array([[1, 0, 2], [0, -4, 0]]))
