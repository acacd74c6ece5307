"""ESFT scores from the base model: token scores are the routed-pair counts, gate scores the routing weights
each expert received, both computed here independently from the gate itself."""

from __future__ import annotations

import pytest
import torch

from expertmesh.experts import select_experts
from expertmesh.jobs.finetune.data import Example
from expertmesh.jobs.finetune.esft import expert_scores
from expertmesh.model import load_model
from expertmesh.model.attention_metadata import AttentionMetadata

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def test_scores_are_the_routed_counts_and_weights(tiny_model_dir):
    model = load_model(tiny_model_dir)
    gen = torch.Generator().manual_seed(2)
    examples = [Example(ids, ids) for ids in (torch.randint(3, 200, (n,), generator=gen).tolist() for n in (7, 12, 5))]
    tokens = expert_scores(model, examples, "esft_token", batch_size=2)
    gate_scores = expert_scores(model, examples, "esft_gate")
    # the same from the gates directly: the hidden states entering each MoE block, routed by its gate
    captured = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.setdefault(i, []).append(a[0]))
             for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        for ex in examples:
            model(torch.tensor(ex.input_ids), AttentionMetadata.without_cache([len(ex.input_ids)]), None)
    for h in hooks:
        h.remove()
    for layer, inputs in captured.items():
        weights, ids = model.model.layers[layer].mlp.gate(torch.cat(inputs))
        num = model.config.routing.num_experts
        assert tokens[layer] == torch.bincount(ids.reshape(-1), minlength=num).double().tolist()
        want = torch.zeros(num, dtype=torch.float64).index_add_(0, ids.reshape(-1), weights.reshape(-1).double())
        assert gate_scores[layer] == pytest.approx(want.tolist(), rel=1e-5)
    chosen = select_experts(gate_scores, 0.3)
    assert set(chosen) == set(captured) and all(0 < len(v) < model.config.routing.num_experts for v in chosen.values())
    with pytest.raises(ValueError, match="kind must be one of"):
        expert_scores(model, examples, "esft_loss")
