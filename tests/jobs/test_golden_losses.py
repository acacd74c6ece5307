"""The first training losses of the `tiny` preset at a fixed seed, against a golden file: any change to the
model's training forward, the loss, the LoRA initialisation or the optimizer step that moves them shows
here. Regenerate on purpose with `EXPERTMESH_WRITE_GOLDEN=1` (and say why in the commit)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from expertmesh.jobs.finetune.data import Example
from expertmesh.jobs.finetune.local_step import LocalTrainer
from expertmesh.model.lora import apply_lora
from expertmesh.model import load_model
from expertmesh.testing import write_random_checkpoint

GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"
pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def first_losses(model_dir) -> list[float]:
    model = load_model(model_dir)
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    torch.manual_seed(0)
    trainable = apply_lora(model, rank=4, alpha=8, targets=("attention", "shared_experts", "routed_experts"),
                           experts={layer: [0, 3, 7] for layer in moe})
    gen = torch.Generator().manual_seed(0)
    batch = [Example(ids, ids) for ids in (torch.randint(3, 250, (20,), generator=gen).tolist() for _ in range(4))]
    trainer = LocalTrainer(model, trainable, lr=5e-3)
    return [trainer.step(batch).loss for _ in range(6)]


def test_the_first_losses_of_tiny_match_the_golden_file(tmp_path):
    losses = first_losses(write_random_checkpoint("tiny", tmp_path / "tiny", seed=0))
    if os.environ.get("EXPERTMESH_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"preset": "tiny", "seed": 0, "losses": losses}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=1e-4)
    assert losses[-1] < losses[0]  # and they fall
