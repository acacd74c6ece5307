"""One process's training step: the loss over a batch, its backward, AdamW on the adapters only, and the
expert load the step's forward routed (what the imbalance guard reads). Ray Train runs one of these per
worker and adds the workers' gradients, sums and counts.

`router_checksums` proves the router frozen: a digest of every gate weight and correction bias, bitwise."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from expertmesh.jobs.finetune.data import Example
from expertmesh.jobs.finetune.balance import balance_loss
from expertmesh.jobs.finetune.loss import causal_lm_loss
from expertmesh.jobs.finetune.routing import moe_gates, on_routing
from expertmesh.model import MoECausalLM
from expertmesh.model.moe import Router


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float  # mean over the batch's labelled tokens
    tokens: int  # labelled tokens
    lr: float
    counts: dict[int, list[int]]  # per MoE layer, (token, expert) pairs routed to each expert
    aux_loss: float = 0.0  # the balance loss per sequence (before its coefficient), when it is on


def router_checksums(model: MoECausalLM) -> dict[str, str]:
    """{tensor name: sha256 of its bytes} for every tensor of every router (gate weights, correction biases)."""
    sums = {}
    for name, module in model.named_modules():
        if isinstance(module, Router):
            tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
            for tensor_name, tensor in sorted(tensors.items()):
                if tensor is not None:
                    data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
                    sums[f"{name}.{tensor_name}"] = hashlib.sha256(data).hexdigest()
    return sums


@contextmanager
def routing_counts(model: MoECausalLM) -> Iterator[dict[int, list[int]]]:
    """Counts, per MoE layer, the (token, expert) pairs every forward inside the block routes."""
    sizes = {layer: gate.weight.shape[0] for layer, gate in moe_gates(model).items()}
    counts = {layer: torch.zeros(n, dtype=torch.int64) for layer, n in sizes.items()}

    def count(layer: int, _weights: torch.Tensor, ids: torch.Tensor) -> None:
        counts[layer] += torch.bincount(ids.reshape(-1).cpu(), minlength=sizes[layer])

    result: dict[int, list[int]] = {}
    try:
        with on_routing(model, count):
            yield result
    finally:
        result.update({layer: c.tolist() for layer, c in counts.items()})


class RemoteExperts(Protocol):
    """Where the routed experts' adapters train when not in this process (the actor graph's shards)."""

    def begin(self, step: int) -> None: ...

    def finish(self, step: int, lr: float) -> None:
        """After this worker's backward of `step`: the remote adapters' optimizer step at `lr`."""
        ...


class LocalTrainer:
    def __init__(self, model: MoECausalLM, trainable: Mapping[str, torch.nn.Parameter], *, lr: float,
                 weight_decay: float = 0.0, remote: RemoteExperts | None = None, aux_loss_coef: float = 0.0):
        """`trainable`: the adapters trained here. With `remote`, the routed experts' adapters train there
        (and `trainable` may hold none). `aux_loss_coef`: the sequence-wise balance loss's weight."""
        if not trainable and remote is None:
            raise ValueError("nothing to train: the model carries no adapter")
        self.model, self.trainable, self.remote = model, dict(trainable), remote
        self._lr = lr
        self.optimizer = (torch.optim.AdamW(self.trainable.values(), lr=lr, weight_decay=weight_decay)
                          if self.trainable else None)
        self.aux_loss_coef = aux_loss_coef
        self.steps = 0

    @property
    def lr(self) -> float:
        return self._lr

    def scale_lr(self, factor: float) -> None:
        self._lr *= factor
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = self._lr

    def load_lr(self, lr: float) -> None:
        """The learning rate a resumed run had reached."""
        self._lr = lr
        self.scale_lr(1.0)

    def step(self, examples: Sequence[Example]) -> StepResult:
        """One optimizer step over `examples` (this worker's share of the batch). Under torch.distributed, the
        labelled-token counts, the gradients and the routed counts are summed over every worker first, so
        the step equals one over the whole batch in one process."""
        self.model.train()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        step = self.steps + 1
        if self.remote is not None:
            self.remote.begin(step)
        with routing_counts(self.model) as counts, balance_loss(self.model, self.aux_loss_coef > 0) as balance:
            total, tokens = causal_lm_loss(self.model, examples)
        device = total.device  # where the process group's collectives run (the GPU under NCCL)
        aux = balance.value(total)  # summed over this share's sequences and the MoE layers
        everywhere = _sum(torch.tensor([float(tokens), total.item(), len(examples), aux.item()], dtype=torch.float64,
                                       device=device))
        all_tokens, all_loss, all_sequences, all_aux = (int(everywhere[0]), float(everywhere[1]),
                                                        int(everywhere[2]), float(everywhere[3]))
        objective = total / all_tokens
        if self.aux_loss_coef > 0:
            objective = objective + self.aux_loss_coef * aux / all_sequences
        objective.backward()
        for p in self.trainable.values():
            if p.grad is None:  # an adapter of an expert no token of this share reached
                p.grad = torch.zeros_like(p)
            p.grad = _sum(p.grad)
        if self.optimizer is not None:
            self.optimizer.step()
        if self.remote is not None:
            self.remote.finish(step, self.lr)
        self.steps = step
        layers = sorted(counts)
        if layers:
            summed = _sum(torch.tensor([counts[layer] for layer in layers], dtype=torch.int64, device=device))
            counts = {layer: row.tolist() for layer, row in zip(layers, summed.cpu())}
        return StepResult(self.steps, all_loss / all_tokens, all_tokens, self.lr, dict(counts),
                          all_aux / all_sequences if self.aux_loss_coef > 0 else 0.0)


def barrier() -> None:
    """Waits for every worker of the default process group (nothing without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor summed over every worker of the default process group (itself without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor
