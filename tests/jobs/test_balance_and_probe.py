"""The sequence-wise balance loss (DeepSeek-V3, eq. 17-20) against the formula written out term by term, its
known value for perfectly even routing, and its gradient reaching the adapters through the frozen gates;
the probe's top-k overlap on routings with known answers."""

from __future__ import annotations

import pytest
import torch

from expertmesh.jobs.finetune.balance import sequence_balance
from expertmesh.jobs.finetune.data import Example
from expertmesh.jobs.finetune.local_step import LocalTrainer
from expertmesh.jobs.finetune.probe import probe_routing, topk_overlap
from expertmesh.model import load_model
from expertmesh.model.lora import apply_lora

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def balance_by_the_paper(scores: torch.Tensor, ids: torch.Tensor, lens: list[int]) -> float:
    total, start = 0.0, 0
    n, k = scores.shape[1], ids.shape[1]
    for length in lens:
        s, chosen = scores[start:start + length].tolist(), ids[start:start + length].tolist()
        start += length
        for i in range(n):
            f = n / (k * length) * sum(i in row for row in chosen)
            p = sum(row[i] / sum(row) for row in s) / length
            total += f * p
    return total


def test_sequence_balance_is_the_papers_formula():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(11, 8, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(11)])
    lens = [4, 7]
    assert float(sequence_balance(scores, ids, lens)) == pytest.approx(balance_by_the_paper(scores, ids, lens),
                                                                       rel=1e-6)
    # even routing (every expert chosen equally often, equal scores): f_i = 1 and P_i = 1/N, so 1 per sequence
    even_ids = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert float(sequence_balance(torch.ones(4, 4), even_ids, [4])) == pytest.approx(1.0)
    # all tokens on the same experts, which also have the highest scores: above 1
    skewed = torch.tensor([[5.0, 5.0, 0.1, 0.1]] * 4)
    assert float(sequence_balance(skewed, torch.tensor([[0, 1]] * 4), [4])) > 1.5


def test_the_balance_loss_trains_the_adapters_through_the_frozen_gates(tiny_model_dir):
    gen = torch.Generator().manual_seed(1)
    batch = [Example(ids, ids) for ids in (torch.randint(3, 200, (16,), generator=gen).tolist() for _ in range(2))]
    results, adapters = [], []
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        model = load_model(tiny_model_dir)
        trainable = apply_lora(model, rank=4, alpha=8, targets=("attention",))
        trainer = LocalTrainer(model, trainable, lr=1e-2, aux_loss_coef=coef)
        results.append(trainer.step(batch))
        adapters.append({n: p.detach().clone() for n, p in trainable.items()})
    assert results[0].aux_loss == 0.0 and results[1].aux_loss > 0  # reported only when on
    assert results[0].loss == pytest.approx(results[1].loss)  # `loss` stays the cross entropy
    moved = {n for n in adapters[0] if not torch.equal(adapters[0][n], adapters[1][n])}
    # every attention adapter of a layer at or below an MoE gate feeds that gate, so the loss moves it
    assert moved and all(".self_attn." in n for n in moved)


def test_topk_overlap_has_the_known_answers(tiny_model_dir):
    base = {1: torch.tensor([[0, 1], [2, 3]]), 2: torch.tensor([[4, 5], [6, 7]])}
    assert topk_overlap(base, base) == {1: 1.0, 2: 1.0}
    now = {1: torch.tensor([[1, 9], [3, 2]]), 2: torch.tensor([[8, 9], [9, 8]])}
    assert topk_overlap(base, now) == {1: 0.75, 2: 0.0}
    with pytest.raises(ValueError, match="layer 1"):
        topk_overlap(base, {1: torch.tensor([[0, 1]]), 2: base[2]})
    model = load_model(tiny_model_dir)
    probe = [Example(list(range(5, 17)), list(range(5, 17)))]
    routed = probe_routing(model, probe)
    assert routed and all(ids.shape == (12, model.config.routing.top_k) for ids in routed.values())
    assert topk_overlap(routed, probe_routing(model, probe)) == {layer: 1.0 for layer in routed}
