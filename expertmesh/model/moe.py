"""The MoE block: gate, routed experts stored stacked [E, ...], optional (gated) shared expert.

Routed experts sit behind a backend seam: the block hands `(layer, hidden_states [T, H])` to a
`RoutedExpertsBackend`, which returns the weighted routed output [T, H]. The local backend runs the gate
and the fused-MoE kernel in this process; the actor graph's backend ships the same hidden states to the
router actor, which calls the same `route` and `fused_moe` functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh import kernels
from expertmesh.model.config import ModelConfig, RoutingConfig
from expertmesh.model.layers import Linear, MLP

if TYPE_CHECKING:
    from expertmesh.model.adapters import RoutedExpertAdapters


def route(
    hidden_states: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, routing: RoutingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of [T, H] tokens -> (weights [T, K] float32, expert ids [T, K] int64)."""
    router_logits = F.linear(hidden_states.float(), gate_weight.float())  # [T, E], always float32
    return kernels.topk_gating(
        router_logits,
        routing.top_k,
        scoring_func=routing.scoring_func,
        correction_bias=bias.float() if bias is not None else None,
        n_group=routing.n_group,
        topk_group=routing.topk_group,
        group_score=routing.group_score,
        renormalize=routing.renormalize,
        scaling_factor=routing.scaling_factor,
    )


class Router(nn.Module):
    def __init__(self, hidden_size: int, routing: RoutingConfig):
        super().__init__()
        self.routing = routing
        self.weight = nn.Parameter(torch.empty(routing.num_experts, hidden_size))
        if routing.correction_bias:
            # The bias steers selection only; it is a buffer, not a trainable weight.
            self.register_buffer("e_score_correction_bias", torch.zeros(routing.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(x, self.weight, self.e_score_correction_bias, self.routing)


class RoutedExperts(nn.Module):
    adapters: RoutedExpertAdapters | None = None  # LoRA adapters served on these experts (model/adapters.py)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))  # gate rows, then up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.adapters is not None and self.adapters.in_use:
            return self.adapters.forward(x, topk_weights, topk_ids, self.w13, self.w2)
        if x.dtype != self.w13.dtype:  # bf16 experts under float32 activations (see layers.Linear)
            return kernels.fused_moe_mixed(x, self.w13, self.w2, topk_weights, topk_ids)
        return kernels.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)


class PendingRouted(Protocol):
    """Routed-expert output still being computed elsewhere; `wait` returns it, [T, H]."""

    def wait(self) -> torch.Tensor: ...


class RoutedExpertsBackend(Protocol):
    """Returns the routed output, or a `PendingRouted` so the block computes its shared experts meanwhile."""

    def __call__(
        self, layer_idx: int, block: MoEBlock, hidden_states: torch.Tensor
    ) -> torch.Tensor | PendingRouted: ...


def local_backend(layer_idx: int, block: MoEBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    """Gate and experts in this process; the block's routing observer hears the decisions."""
    topk_weights, topk_ids = block.gate(hidden_states)
    if block.routing_observer is not None:
        block.routing_observer(layer_idx, topk_ids)
    return block.experts(hidden_states, topk_weights, topk_ids)


class MoEBlock(nn.Module):
    # Called with (layer_idx, topk_ids [T, K]) for each routing decision made in this process (the engine
    # counts expert load with it).
    routing_observer: Callable[[int, torch.Tensor], None] | None = None

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(config.hidden_size, config.routing)
        self.experts = RoutedExperts(config.routing.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.shared_intermediate_size) if config.shared_intermediate_size else None
        )
        self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        self.backend: RoutedExpertsBackend = local_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        routed = self.backend(self.layer_idx, self, x)
        shared = None
        if self.shared_experts is not None:  # while a remote backend's experts run
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        out = routed if isinstance(routed, torch.Tensor) else routed.wait()
        return out if shared is None else out + shared
