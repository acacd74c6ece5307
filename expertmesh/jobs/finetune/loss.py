"""The training loss: examples packed into one flat batch (each sequence attends only to itself, as the
serving forward does without a KV cache), next-token cross entropy at the labelled positions.

It returns the sum and the count rather than the mean: with data parallelism every worker's sums and counts
are added before dividing, so an example weighs the same whichever worker it landed on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from expertmesh.jobs.finetune.data import IGNORE_INDEX, Example
from expertmesh.model import MoECausalLM
from expertmesh.model.attention_metadata import AttentionMetadata


def pack(examples: Sequence[Example], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(input ids [T], next-token targets [T], sequence lengths): position t of a sequence is scored on its
    label at t + 1; each sequence's last position and unlabelled positions get IGNORE_INDEX."""
    if not examples:
        raise ValueError("a batch needs at least one example")
    ids, targets = [], []
    for ex in examples:
        ids += ex.input_ids
        targets += ex.labels[1:] + [IGNORE_INDEX]
    lens = [len(ex.input_ids) for ex in examples]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    return as_tensor(ids), as_tensor(targets), lens


def causal_lm_loss(model: MoECausalLM, examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
    """(summed cross entropy over the labelled next tokens, how many there are)."""
    device = model.lm_head.weight.device
    input_ids, targets, lens = pack(examples, device)
    labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    logits = model(input_ids, AttentionMetadata.without_cache(lens, device), None, logits_indices=labelled)
    return F.cross_entropy(logits, targets[labelled], reduction="sum"), int(labelled.numel())
