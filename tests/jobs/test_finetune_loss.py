"""The training loss and its gradients, against transformers on the same checkpoint: a packed batch of
examples of different lengths, some positions unlabelled, gives transformers' padded-batch loss, and the
same gradients on the attention, embedding, LM-head and gate weights (the gate's path matters even with the
router frozen: the hidden states' gradient flows through its scores)."""

from __future__ import annotations

import pytest
import torch

from expertmesh.jobs.finetune.data import IGNORE_INDEX, Example
from expertmesh.jobs.finetune.loss import causal_lm_loss, pack
from expertmesh.model import load_model
from tests.hf_models import build_hf_checkpoint, load_reference, make_prompts

# parameters named alike in both models
SHARED = ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.o_proj.weight",
          "model.layers.1.self_attn.o_proj.weight")


def test_pack_scores_each_position_on_the_next_label_within_its_sequence():
    ids, targets, lens = pack([Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5], [4, 5])])
    assert ids.tolist() == [1, 2, 3, 4, 5] and lens == [3, 2]
    assert targets.tolist() == [2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_loss_and_gradients_equal_transformers(tmp_path, family):
    ckpt = build_hf_checkpoint(family, tmp_path / family)
    ref = load_reference(ckpt)
    ours = load_model(ckpt)
    vocab = ref.config.vocab_size
    prompts = make_prompts(vocab, [9, 5, 12], seed=3)
    examples = [Example(p, [IGNORE_INDEX] * 3 + p[3:]) if i == 1 else Example(p, list(p))
                for i, p in enumerate(prompts)]

    # transformers: right-padded batch, -100 on padding and unlabelled positions; its loss is the mean
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    labels = torch.full((len(prompts), width), IGNORE_INDEX)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex.input_ids), torch.tensor(ex.labels), 1
    ref.train(False)
    want = ref(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    want.backward()

    gate = "model.layers.1.mlp.gate.weight" if family == "deepseek_v3" else "model.layers.0.mlp.gate.weight"
    ref_gate = gate  # transformers 5 names the MoE block `mlp` in every family, as we do
    params = dict(ours.named_parameters())
    for name in (*SHARED, gate):
        params[name].requires_grad_(True)
    total, count = causal_lm_loss(ours, examples)
    (total / count).backward()
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert (total / count).item() == pytest.approx(want.item(), rel=1e-5)
    ref_params = dict(ref.named_parameters())
    for name in SHARED:
        torch.testing.assert_close(params[name].grad, ref_params[name].grad, rtol=1e-3, atol=1e-6, msg=name)
    torch.testing.assert_close(params[gate].grad, ref_params[ref_gate].grad, rtol=1e-3, atol=1e-6, msg=gate)
    assert all(params[name].grad.abs().sum() > 0 for name in (*SHARED, gate))  # nothing compared is all zeros
