"""Expert-load health figures, checked against torch's own Categorical entropy and hand-worked counts."""

import math

import pytest
import torch

from expertmesh.experts.health import expert_health, expert_shares, layer_health


def test_figures_match_a_direct_computation():
    counts = [30, 0, 10, 20, 0, 60]  # 120 pairs, top-2: 60 tokens
    h = layer_health(3, counts, top_k=2)
    probs = torch.tensor(counts, dtype=torch.float64) / 120
    want_entropy = torch.distributions.Categorical(probs=probs).entropy().item() / math.log(6)
    assert h.layer == 3 and h.routed_pairs == 120 and h.tokens == 60
    assert h.busiest_expert == 5 and h.busiest_share == pytest.approx(60 / 60)  # every token chose expert 5
    assert h.max_over_mean == pytest.approx(60 / 20)
    assert h.entropy == pytest.approx(want_entropy)
    assert h.idle_experts == 2


def test_even_and_collapsed_routing_are_the_two_ends():
    even = layer_health(1, [5] * 8, top_k=2)
    assert even.entropy == pytest.approx(1.0) and even.max_over_mean == pytest.approx(1.0)
    assert even.busiest_share == pytest.approx(5 / 20)
    collapsed = layer_health(1, [0, 0, 12, 0], top_k=1)
    assert collapsed.entropy == 0.0 and collapsed.busiest_share == 1.0 and collapsed.idle_experts == 3


def test_a_layer_with_no_tokens_reports_zeros_and_bad_counts_are_refused():
    assert layer_health(2, [0, 0, 0], top_k=2).routed_pairs == 0
    with pytest.raises(ValueError, match="non-negative"):
        layer_health(2, [1, -1], top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        layer_health(2, [1, 1], top_k=0)
    assert [h.layer for h in expert_health({4: [1, 2], 1: [3, 0]}, top_k=1)] == [1, 4]


def test_expert_shares_are_of_the_layers_tokens():
    assert expert_shares([6, 2, 0, 0], top_k=2) == [1.5, 0.5, 0.0, 0.0]  # 4 tokens, 8 pairs
    assert expert_shares([0, 0], top_k=1) == [0.0, 0.0]
