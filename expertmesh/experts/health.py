"""Expert-load health figures from the router's per-expert token counts, per MoE layer.

What MoE operators watch: the busiest expert's share of the layer's tokens (healthy below ~40%), its load
against the mean (what hot-expert replication brings down), and the routing entropy (near 1 when tokens
spread over every expert, near 0 when they collapse onto a few). Pure Python over counts: the router, the
metrics endpoint and the fine-tuning guard all read the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class LayerHealth:
    layer: int
    routed_pairs: int  # (token, expert) pairs counted
    tokens: int  # routed_pairs / top_k
    busiest_expert: int
    busiest_share: float  # fraction of the layer's tokens that went to the busiest expert, in [0, 1]
    max_over_mean: float  # busiest expert's pairs over the mean per expert; 1.0 is perfectly even
    entropy: float  # entropy of the pairs' distribution over experts, divided by log(num_experts): [0, 1]
    idle_experts: int  # experts that received no token

    def to_dict(self) -> dict:
        return asdict(self)


def layer_health(layer: int, counts: Sequence[int], top_k: int) -> LayerHealth:
    """Figures for one layer's per-expert pair counts; a layer that saw no token reports zeros."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"counts of layer {layer} must be a non-empty list of non-negative integers")
    total = sum(counts)
    num_experts = len(counts)
    busiest = max(range(num_experts), key=counts.__getitem__)
    if total == 0:
        return LayerHealth(layer, 0, 0, busiest, 0.0, 0.0, 0.0, num_experts)
    tokens = total / top_k
    entropy = -sum(c / total * math.log(c / total) for c in counts if c)
    return LayerHealth(
        layer=layer, routed_pairs=total, tokens=round(tokens), busiest_expert=busiest,
        busiest_share=counts[busiest] / tokens, max_over_mean=counts[busiest] / (total / num_experts),
        entropy=entropy / math.log(num_experts) if num_experts > 1 else 1.0,
        idle_experts=sum(1 for c in counts if c == 0),
    )


def expert_health(counts: Mapping[int, Sequence[int]], top_k: int) -> list[LayerHealth]:
    """Per MoE layer, in layer order, from {layer: per-expert pair counts} (as the router reports them)."""
    return [layer_health(layer, counts[layer], top_k) for layer in sorted(counts)]


def expert_shares(counts: Sequence[int], top_k: int) -> list[float]:
    """Each expert's share of its layer's tokens (each token picks `top_k` experts, so an even spread gives
    every expert top_k / num_experts); zeros for a layer that saw no token."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    tokens = sum(counts) / top_k
    return [c / tokens if tokens else 0.0 for c in counts]
