"""ESFT's selection rule on loads with a known answer: per layer, the fewest most relevant experts whose shares
reach the threshold."""

import pytest

from expertmesh.experts import relevance_shares, select_experts


def test_shares_sum_to_one_and_a_silent_layer_has_none():
    assert relevance_shares([1, 3, 0, 4]) == [0.125, 0.375, 0.0, 0.5]
    assert relevance_shares([0, 0]) == [0.0, 0.0]
    with pytest.raises(ValueError):
        relevance_shares([1, -1])


def test_the_fewest_most_relevant_experts_that_reach_the_threshold():
    totals = {1: [10, 50, 5, 35], 3: [25, 25, 25, 25], 5: [0, 0, 0, 0], 2: [1, 0, 0, 99]}
    assert select_experts(totals, 0.5) == {1: [1], 2: [3], 3: [0, 1], 5: []}
    assert select_experts(totals, 0.6) == {1: [1, 3], 2: [3], 3: [0, 1, 2], 5: []}
    # all of it: every expert that saw a token, and none that did not
    assert select_experts(totals, 1.0) == {1: [0, 1, 2, 3], 2: [0, 3], 3: [0, 1, 2, 3], 5: []}


def test_a_concentrated_task_picks_few_and_a_spread_one_many():
    concentrated = [1000 if e < 4 else 10 for e in range(64)]
    spread = [100 + e for e in range(64)]
    picked = select_experts({0: concentrated, 1: spread}, 0.2)
    assert picked[0] == [0] and len(picked[1]) > 8


@pytest.mark.parametrize("threshold", [0, -0.1, 1.5])
def test_threshold_out_of_range_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        select_experts({0: [1, 2]}, threshold)
