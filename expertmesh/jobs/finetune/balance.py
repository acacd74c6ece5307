"""DeepSeek-V3's sequence-wise auxiliary balance loss, for a job that wants one (`guard.aux_loss_coef` > 0).

Per MoE layer and per sequence of T tokens, with N routed experts and top-K routing:
    f_i = N / (K T) * #{t : expert i among token t's top K}       (the expert's load, 1 when even)
    P_i = 1/T * sum_t s'_{i,t},  s'_{i,t} = s_{i,t} / sum_j s_{j,t}  (its mean normalised affinity)
    L = sum_i f_i P_i
The job sums L over sequences and layers and weighs it by the coefficient over the batch's sequences. The
router is frozen, so the gradient reaches only what feeds the gates: the hidden states, and so the adapters
of the layers below. f is a count (no gradient), as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from expertmesh.jobs.finetune.routing import moe_gates
from expertmesh.model import MoECausalLM


class _Balance:
    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []
        self.lens: list[int] | None = None

    def value(self, like: torch.Tensor) -> torch.Tensor:
        """The loss summed over the sequences and MoE layers of the forwards inside (0 when off)."""
        if not self.terms:
            return like.new_zeros(())
        return torch.stack(self.terms).sum()


def sequence_balance(scores: torch.Tensor, topk_ids: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """sum over sequences of sum_i f_i P_i for one layer: `scores` [T, N] the affinities (sigmoid or softmax
    of the gate logits), `topk_ids` [T, K] the experts chosen, `lens` the sequences' lengths (summing to T)."""
    num_experts, top_k = scores.shape[1], topk_ids.shape[1]
    normalised = scores / scores.sum(dim=-1, keepdim=True)
    total = scores.new_zeros(())
    for s, ids in zip(normalised.split(lens), topk_ids.split(lens)):
        length = s.shape[0]
        load = torch.bincount(ids.reshape(-1), minlength=num_experts).to(s.dtype) * (num_experts / (top_k * length))
        total = total + (load * s.mean(dim=0)).sum()
    return total


@contextmanager
def balance_loss(model: MoECausalLM, enabled: bool, lens: list[int] | None = None) -> Iterator[_Balance]:
    """Collects the balance loss of every forward inside (when `enabled`). The sequences' lengths are read
    from each forward's attention metadata unless given."""
    balance = _Balance()
    if not enabled:
        yield balance
        return
    seen_lens: list[list[int]] = []

    def take_lens(_module, args) -> None:
        meta = args[1] if len(args) > 1 else None
        seen_lens.append(list(lens) if lens is not None else list(meta.query_lens))

    def add(module, args, out) -> None:
        logits = F.linear(args[0].float(), module.weight.float())
        scores = logits.sigmoid() if module.routing.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        balance.terms.append(sequence_balance(scores, out[1], seen_lens[-1]))

    handles = [model.register_forward_pre_hook(take_lens)]
    handles += [gate.register_forward_hook(add) for gate in moe_gates(model).values()]
    try:
        yield balance
    finally:
        for h in handles:
            h.remove()
