"""An expert shard in training mode: LoRA adapters on the experts it holds that a fine-tuning job chose, their
optimizer state, and each training worker's forwards kept until their backward.

The shard is the only place its experts' adapters live during a job. A worker's forward through a layer
sends the hidden states routed here; the shard answers with its weighted expert output and keeps the inputs.
The backward sends the gradient of that output; the shard recomputes the layer's expert math under autograd
(cheaper in memory than keeping every intermediate) and answers with the gradients of the hidden states and
routing weights, adding its adapters' gradients to the step's sums. Once every worker's backward of a step
is in, `apply` takes one AdamW step, exactly as a job holding the whole model would: AdamW is elementwise,
so splitting the parameters over shards changes nothing. The expert math is `expert_lora_forward`, the one
local mode runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import torch

from expertmesh.actors.expert_shard import Expert, ExpertShard
from expertmesh.model.lora import expert_lora_forward

AdapterTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # w13 A [r, H], B [2I, r]; w2 A, B


class ShardTrainer:
    def __init__(self, shard: ExpertShard, adapters: Mapping[Expert, AdapterTensors], *, rank: int, alpha: float,
                 weight_decay: float = 0.0):
        """`adapters`: the initial adapter of each (layer, expert) this shard holds that the job trains (the
        job draws them, so that every mode of a job starts from the same ones). Experts not named carry none."""
        held = set(shard.experts)
        foreign = sorted(set(adapters) - held)
        if foreign:
            raise ValueError(f"expert shard {shard.shard_index} does not hold experts {foreign[:8]} it was given "
                             f"adapters for")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.shard, self.scaling = shard, alpha / rank
        self.weight_decay = weight_decay
        self._lock = threading.Lock()
        self._saved: dict[tuple[str, int, int], tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.last_compute_s = 0.0
        self.chosen: dict[int, list[int]] = {}  # layer -> logical experts with an adapter, slot order
        self.slot: dict[int, torch.Tensor] = {}  # layer -> [held rows] slot of each held row, -1 for none
        self.params: dict[int, list[torch.nn.Parameter]] = {}  # layer -> [w13 A, w13 B, w2 A, w2 B], [S, ...]
        for layer, held_layer in shard.layers.items():
            experts = sorted(e for (l, e) in adapters if l == layer)
            slot = torch.full((len(held_layer.expert_ids),), -1, dtype=torch.int64)
            if experts:
                for s, e in enumerate(experts):
                    slot[held_layer.expert_ids.index(e)] = s
                tensors = [torch.stack([adapters[layer, e][i] for e in experts]) for i in range(4)]
                dev = shard.device
                dtype = shard.weight_dtype
                self.params[layer] = [torch.nn.Parameter(t.detach().to(dev, dtype).clone()) for t in tensors]
                self.chosen[layer] = experts
            self.slot[layer] = slot.to(shard.device)
        every = [p for layer in sorted(self.params) for p in self.params[layer]]
        self.optimizer = torch.optim.AdamW(every, lr=1e-3, weight_decay=weight_decay) if every else None

    def _adapters(self, layer: int) -> tuple:
        params = self.params.get(layer)
        if params is None:  # no adapter on this layer's experts here: zero-size stand-ins the math never reads
            empty = torch.empty(0, device=self.shard.device, dtype=self.shard.weight_dtype)
            return (empty, empty, empty, empty)
        return tuple(params)

    def _math(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        held = self.shard.layers[layer]
        local = self.shard.local_rows(layer, expert_ids)
        dev = self.shard.device
        return expert_lora_forward(hidden.to(dev), weights.to(dev), local.to(dev), held.w13, held.w2, self.slot[layer],
                                   self._adapters(layer), self.scaling)

    def forward(self, worker: str, step: int, call: int, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor, version: int, keep: bool) -> torch.Tensor:
        """The weighted output of this shard's experts (adapters included) for one worker's forward of `layer`;
        with `keep`, the inputs are kept until that forward's backward."""
        with self._lock:
            self.shard.check(layer, hidden, expert_ids, weights, version)
            start = time.perf_counter()
            with torch.no_grad():
                out = self._math(layer, hidden, expert_ids, weights).cpu()
            if keep:
                key = (worker, step, call)
                if key in self._saved:
                    raise ValueError(f"worker {worker} sent forward {call} of step {step} twice")
                self._saved[key] = (layer, hidden, expert_ids, weights)
            self.last_compute_s = time.perf_counter() - start
            return out

    def backward(self, worker: str, step: int, call: int, layer: int,
                 grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of a kept forward's hidden states [T, H] and routing weights [T, K] (zero on slots of
        other shards), given its output's; the adapters' gradients are added to the step's sums."""
        with self._lock:
            saved = self._saved.pop((worker, step, call), None)
            if saved is None:
                raise ValueError(f"expert shard {self.shard.shard_index} holds no forward {call} of step {step} "
                                 f"from worker {worker} to take a backward of")
            saved_layer, hidden, expert_ids, weights = saved
            if saved_layer != layer or grad_output.shape != hidden.shape:
                raise ValueError(f"the backward of forward {call} (layer {saved_layer}, {list(hidden.shape)}) came "
                                 f"for layer {layer} with a gradient of {list(grad_output.shape)}")
            start = time.perf_counter()
            dev = self.shard.device
            x = hidden.to(dev).detach().requires_grad_(True)
            w = weights.to(dev).detach().requires_grad_(True)
            with torch.enable_grad():
                out = self._math(layer, x, expert_ids, w)
                inputs = [x, w] + list(self.params.get(layer, ()))
                torch.autograd.backward(out, grad_output.to(dev, out.dtype), inputs=inputs)
            grad_x = x.grad if x.grad is not None else torch.zeros_like(x)
            grad_w = w.grad if w.grad is not None else torch.zeros_like(w)
            self.last_compute_s = time.perf_counter() - start
            return grad_x.cpu(), grad_w.float().cpu()

    def apply(self, step: int, lr: float) -> None:
        """One AdamW step at `lr` with the gradients every worker sent for `step`; refused, changing nothing,
        while a kept forward of the step still waits for its backward."""
        with self._lock:
            waiting = sorted({w for (w, s, _) in self._saved if s == step})
            if waiting:
                raise ValueError(f"expert shard {self.shard.shard_index}: workers {waiting} sent forwards of step "
                                 f"{step} without their backward")
            self._saved = {k: v for k, v in self._saved.items() if k[1] > step}  # stale forwards of earlier steps
            if self.optimizer is None:
                return
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for params in self.params.values():
                for p in params:
                    if p.grad is None:  # no token of this step reached the expert: a step with zero gradient
                        p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def adapters(self) -> dict[Expert, AdapterTensors]:
        """The current adapter of every trained expert here, on the CPU."""
        with self._lock:
            return {(layer, e): tuple(p[s].detach().cpu().clone() for p in self.params[layer])
                    for layer, experts in self.chosen.items() for s, e in enumerate(experts)}

    def state(self) -> dict:
        """What a checkpoint needs to resume this shard: the adapters and the optimizer's state."""
        with self._lock:
            return {"params": {layer: [p.detach().cpu().clone() for p in ps] for layer, ps in self.params.items()},
                    "optimizer": None if self.optimizer is None else _cpu(self.optimizer.state_dict())}

    def load_state(self, state: Mapping) -> None:
        """Resumes from `state()` of a shard holding the same trained experts."""
        with self._lock:
            params = state["params"]
            if sorted(params) != sorted(self.params) or any(
                    [tuple(t.shape) for t in params[layer]] != [tuple(p.shape) for p in self.params[layer]]
                    for layer in self.params):
                raise ValueError(f"expert shard {self.shard.shard_index}: the checkpoint's adapters do not match "
                                 f"the experts this shard trains")
            with torch.no_grad():
                for layer, ps in self.params.items():
                    for p, t in zip(ps, params[layer]):
                        p.copy_(t)
            if self.optimizer is not None and state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            self._saved.clear()


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def split_adapters(adapters: Mapping[Expert, AdapterTensors],
                   experts: Sequence[Expert]) -> dict[Expert, AdapterTensors]:
    """The adapters among `adapters` of the experts in `experts` (what one shard holds)."""
    mine = set(experts)
    return {k: v for k, v in adapters.items() if k in mine}
