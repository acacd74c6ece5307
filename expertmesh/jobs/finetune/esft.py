"""ESFT's expert scores from the base model on a sample of the training data: per MoE layer, the gate scores
each routed expert received (`esft_gate`) or the tokens routed to it (`esft_token`). `select_experts`
(expertmesh.experts) turns them into the experts that get adapters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from expertmesh.jobs.finetune.data import Example
from expertmesh.jobs.finetune.loss import pack
from expertmesh.jobs.finetune.routing import moe_gates, on_routing
from expertmesh.model import MoECausalLM
from expertmesh.model.attention_metadata import AttentionMetadata

SCORES = ("esft_gate", "esft_token")


@torch.no_grad()
def expert_scores(model: MoECausalLM, examples: Sequence[Example], kind: str,
                  batch_size: int = 8) -> dict[int, list[float]]:
    """{MoE layer: per-expert total} over every token of `examples`: the summed routing weight each expert
    got (esft_gate), or the number of tokens routed to it (esft_token)."""
    if kind not in SCORES:
        raise ValueError(f"kind must be one of {list(SCORES)}, got {kind!r}")
    sizes = {layer: gate.weight.shape[0] for layer, gate in moe_gates(model).items()}
    totals = {layer: torch.zeros(n, dtype=torch.float64) for layer, n in sizes.items()}

    def add(layer: int, weights: torch.Tensor, ids: torch.Tensor) -> None:
        values = weights if kind == "esft_gate" else torch.ones_like(weights)
        totals[layer].index_add_(0, ids.reshape(-1).cpu(), values.reshape(-1).double().cpu())

    device = model.lm_head.weight.device
    with on_routing(model, add):
        for start in range(0, len(examples), batch_size):
            ids, _, lens = pack(examples[start:start + batch_size], device)
            model(ids, AttentionMetadata.without_cache(lens, device), None, logits_indices=ids[:0])
    return {layer: t.tolist() for layer, t in sorted(totals.items())}
