"""Drift from the base model's routing, on a fixed probe batch: the guard's third figure.

Before step 1 the job routes a few training examples through the base model and keeps every token's top-k
experts per MoE layer. Each step it routes them again (no gradient) and measures, per layer, the mean over
tokens of |top-k now ∩ top-k before| / k: 1 while the routing holds, falling as the adapters move the hidden
states the frozen gates read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from expertmesh.jobs.finetune.data import Example
from expertmesh.jobs.finetune.loss import pack
from expertmesh.jobs.finetune.routing import on_routing
from expertmesh.model import MoECausalLM
from expertmesh.model.attention_metadata import AttentionMetadata


@torch.no_grad()
def probe_routing(model: MoECausalLM, probe: Sequence[Example]) -> dict[int, torch.Tensor]:
    """{MoE layer: top-k expert ids [T, K]} of the probe batch's tokens, in eval mode (no dropout)."""
    routed: dict[int, torch.Tensor] = {}

    def keep(layer: int, _weights: torch.Tensor, ids: torch.Tensor) -> None:
        routed[layer] = ids.cpu()

    was_training = model.training
    model.eval()
    try:
        device = model.lm_head.weight.device
        ids, _, lens = pack(probe, device)
        with on_routing(model, keep):
            model(ids, AttentionMetadata.without_cache(lens, device), None, logits_indices=ids[:0])
    finally:
        model.train(was_training)
    return routed


def topk_overlap(base: Mapping[int, torch.Tensor], now: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """Per layer, the mean over tokens of the share of a token's top-k experts that are still among them."""
    out = {}
    for layer, before in base.items():
        after = now[layer]
        if before.shape != after.shape:
            raise ValueError(f"layer {layer}: the probe routed {list(after.shape)} now but {list(before.shape)} before")
        shared = (before.unsqueeze(2) == after.unsqueeze(1)).any(dim=2).sum(dim=1)  # [T]
        out[layer] = float(shared.float().mean() / before.shape[1])
    return out
