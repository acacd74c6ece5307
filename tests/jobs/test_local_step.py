"""Training steps on the tiny model in one process: the loss falls on a small dataset, the router's tensors
are bitwise what they were (no gradient, no optimizer state), and the step reports the expert load it
routed."""

from __future__ import annotations

import pytest
import torch

from expertmesh.jobs.finetune.data import Example
from expertmesh.jobs.finetune.local_step import LocalTrainer, router_checksums
from expertmesh.model.lora import apply_lora
from expertmesh.model import load_model
from expertmesh.testing import write_random_checkpoint

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("tiny-train"), seed=1)


def test_steps_lower_the_loss_and_leave_the_router_bitwise_frozen(tiny):
    torch.manual_seed(0)
    model = load_model(tiny)
    before = router_checksums(model)
    assert before and all(".gate." in name for name in before)
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    trainable = apply_lora(model, rank=4, alpha=8, targets=("attention", "shared_experts", "routed_experts"),
                           experts={layer: [0, 2, 5] for layer in moe})
    gen = torch.Generator().manual_seed(0)
    batch = [Example(ids, ids) for ids in (torch.randint(3, 200, (24,), generator=gen).tolist() for _ in range(4))]
    trainer = LocalTrainer(model, trainable, lr=1e-2)
    results = [trainer.step(batch) for _ in range(8)]
    assert results[-1].loss < results[0].loss * 0.95  # it learns the batch (7.65 -> 7.05 here)
    assert router_checksums(model) == before
    routers = [p for n, p in model.named_parameters() if ".mlp.gate." in n]
    assert routers and all(p.grad is None and not p.requires_grad for p in routers)
    state = trainer.optimizer.state
    assert all(any(p is q for q in trainable.values()) for p in state)  # optimizer state: adapters only
    top_k = model.config.routing.top_k
    for counts in results[0].counts.values():  # every token of the batch routed top_k times per MoE layer
        assert sum(counts) == 4 * 24 * top_k
    assert sorted(results[0].counts) == moe


def test_scaling_the_learning_rate(tiny):
    model = load_model(tiny)
    trainer = LocalTrainer(model, apply_lora(model, rank=2, alpha=2, targets=("attention",)), lr=1e-3)
    trainer.scale_lr(0.5)
    assert trainer.lr == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="nothing to train"):
        LocalTrainer(model, {}, lr=1e-3)
