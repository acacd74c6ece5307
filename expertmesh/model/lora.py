"""LoRA on our model, expert-aware: low-rank updates on the attention projections, the shared experts and the
routed experts chosen per layer (the others get no adapter weights, so no optimizer state either), with the
base weights frozen and the router untouched.

The update is peft's: y = W x + (alpha / r) B A x, A initialised as peft does (Kaiming-uniform) and B at
zero, so training starts from the base model. `peft_format.py` writes and reads the adapters in peft's own
layout, so transformers + peft load what we train and we load what peft trains."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from expertmesh.model.decoder import MoECausalLM
from expertmesh.model.moe import MoEBlock, RoutedExperts

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                         "o_proj")
SHARED_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _lora_pair(rank: int, in_features: int, out_features: int, batch: tuple[int, ...] = ()) -> tuple[nn.Parameter,
                                                                                                      nn.Parameter]:
    """(A [*batch, r, in] Kaiming-uniform as peft's default init, B [*batch, out, r] zeros)."""
    a = torch.empty(*batch, rank, in_features)
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] matrix
    nn.init.uniform_(a, -bound, bound)
    return nn.Parameter(a), nn.Parameter(torch.zeros(*batch, out_features, rank))


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A, self.lora_B = _lora_pair(rank, base.in_features, base.out_features)
        self.lora_A.data = self.lora_A.data.to(base.weight.dtype)
        self.lora_B.data = self.lora_B.data.to(base.weight.dtype)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # what fused kernels read: the base weight (they run without the update)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base(x)  # [..., out]
        down = F.linear(self.dropout(x), self.lora_A)  # [..., r]
        # One addmm adds the scaled update: no [..., out] product, scaled copy or sum apart, forward or backward.
        out = torch.addmm(base.reshape(-1, base.shape[-1]), down.reshape(-1, down.shape[-1]), self.lora_B.t(),
                          alpha=self.scaling)
        return out.view(base.shape)


class ExpertLora(nn.Module):
    """Routed experts with low-rank updates on `chosen` experts only: on the gate/up projection (w13, [E, 2I, H])
    and the down projection (w2, [E, H, I]). Adapter slot s holds expert chosen[s]."""

    def __init__(self, base: RoutedExperts, chosen: Sequence[int], rank: int, alpha: float):
        super().__init__()
        num_experts, two_i, hidden = base.w13.shape
        intermediate = base.w2.shape[2]
        if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= e < num_experts for e in chosen):
            raise ValueError(f"chosen experts must be distinct ids in [0, {num_experts}), got {list(chosen)}")
        self.base, self.scaling = base, alpha / rank
        self.chosen = sorted(chosen)
        slot = torch.full((num_experts,), -1, dtype=torch.int64)
        slot[self.chosen] = torch.arange(len(self.chosen))
        self.register_buffer("slot", slot, persistent=False)
        n = (len(self.chosen),)
        self.lora_w13_A, self.lora_w13_B = _lora_pair(rank, hidden, two_i, n)
        self.lora_w2_A, self.lora_w2_B = _lora_pair(rank, intermediate, hidden, n)
        for p in (self.lora_w13_A, self.lora_w13_B, self.lora_w2_A, self.lora_w2_B):
            p.data = p.data.to(base.w13.dtype)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return expert_lora_forward(x, topk_weights, topk_ids, self.base.w13, self.base.w2, self.slot,
                                   (self.lora_w13_A, self.lora_w13_B, self.lora_w2_A, self.lora_w2_B), self.scaling)


ExpertAdapters = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # w13 A, w13 B, w2 A, w2 B per slot


def expert_lora_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor, slot: torch.Tensor, adapters: ExpertAdapters, scaling: float) -> torch.Tensor:
    """The routed output [T, H], differentiable in x, the weights and the adapters: each (token, expert) pair
    with an id >= 0 through its expert (rows of the stacked w13 [E, 2I, H] / w2 [E, H, I]), plus the low-rank
    update where `slot[expert]` >= 0 names one, weighted and summed per token in float32. Ids of -1 (pairs
    another shard computes) are skipped. Local mode and the expert shards in training both call this.

    The pairs are sorted by expert once, each expert multiplies one contiguous run of them, and the backward
    is written by hand (`_ExpertLoraFunction`); it also gives w13's and w2's gradients where they require
    one (training's frozen base weights do not)."""
    return _ExpertLoraFunction.apply(x, topk_weights, topk_ids, w13, w2, slot, scaling, *adapters)


@dataclass(frozen=True, slots=True)
class _Runs:
    """The experts with at least one pair, in order, each with its adapter slot (or -1) and its pair count:
    the lengths of the runs the expert-sorted pairs split into."""

    experts: list[int]
    slots: list[int]
    sizes: list[int]


def _sort_pairs(topk_ids: torch.Tensor, slot: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, _Runs]:
    """(the flat indices t * K + k of the pairs with an id >= 0, sorted by expert [P]; their runs)."""
    flat = topk_ids.reshape(-1)
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # counts[0]: the -1 ids
    if len(counts) != num_experts + 1:
        raise ValueError(f"topk_ids holds expert ids up to {len(counts) - 2}; the stacks hold {num_experts}")
    order = torch.argsort(flat, stable=True)[counts[0]:]  # the -1 ids sort first
    experts = [e for e, n in enumerate(counts[1:]) if n]
    slots = slot.tolist()
    return order, _Runs(experts, [slots[e] for e in experts], [counts[e + 1] for e in experts])


def _through_experts(inp: torch.Tensor, runs: _Runs, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     scaling: float, out: torch.Tensor) -> torch.Tensor:
    """inp [P, in] -> out [P, out]: each run through its expert's w [out, in] plus scaling * B A where it has a
    slot. Returns the runs' A projections [P, r] (rows of experts without a slot left unset) for the backward."""
    projected = inp.new_empty(inp.shape[0], a.shape[1] if a.dim() == 3 else 0)
    for expert, s, i, o, p in zip(runs.experts, runs.slots, inp.split(runs.sizes), out.split(runs.sizes),
                                  projected.split(runs.sizes)):
        torch.mm(i, w[expert].t(), out=o)
        if s >= 0:
            torch.mm(i, a[s].t(), out=p)
            o.addmm_(p, b[s].t(), alpha=scaling)
    return projected


def _back_through_experts(grad: torch.Tensor, inp: torch.Tensor, projected: torch.Tensor, runs: _Runs,
                          w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                          row_weight: torch.Tensor | None, grad_inp: torch.Tensor | None,
                          g_w: torch.Tensor | None, g_a: torch.Tensor | None, g_b: torch.Tensor | None) -> None:
    """The backward of `_through_experts` given its output's gradient [P, out]: the input's gradient into
    `grad_inp` [P, in], each weight's added into g_w / g_a / g_b (those not None). `row_weight` [P, 1], if
    given, scales each pair's share of the weights' gradients but not the input's."""
    sizes = runs.sizes
    for expert, s, g_e, i_e, p_e, gi_e, rw_e in zip(runs.experts, runs.slots, grad.split(sizes), inp.split(sizes),
                                                    projected.split(sizes), _split(grad_inp, sizes),
                                                    _split(row_weight, sizes)):
        if gi_e is not None:
            torch.mm(g_e, w[expert], out=gi_e)
        if s >= 0:
            gb = g_e @ b[s] * scaling  # [n, r]
            if gi_e is not None:
                gi_e.addmm_(gb, a[s])
            if g_a is not None:
                g_a[s].addmm_(_times(gb, rw_e).t(), i_e)
            if g_b is not None:
                g_b[s].addmm_(g_e.t(), _times(p_e, rw_e), alpha=scaling)
        if g_w is not None:
            g_w[expert].addmm_(g_e.t(), _times(i_e, rw_e))


def _split(t: torch.Tensor | None, sizes: list[int]) -> Sequence[torch.Tensor | None]:
    return t.split(sizes) if t is not None else [None] * len(sizes)


def _times(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t * rows


class _ExpertLoraFunction(torch.autograd.Function):
    """`expert_lora_forward` with its backward by hand. Autograd over a per-expert loop saves every
    intermediate and turns each `a[s]` and `x[tokens]` into a zero-filled gradient the size of the whole
    tensor; here only the gate/up activations [P, 2I] and the [P, r] A projections are kept, the backward
    recomputes the SwiGLU output and writes each expert's gradients into its own rows. The routing weight's
    gradient is <u, act>, u the gradient of the SwiGLU output before the weight, so the expert outputs [P, H]
    are never kept. A [P, H] buffer is reused once dead: each fresh one costs page faults."""

    @staticmethod
    def forward(ctx, x, topk_weights, topk_ids, w13, w2, slot, scaling, a13, b13, a2, b2):
        order, runs = _sort_pairs(topk_ids, slot, w13.shape[0])
        tokens = order // topk_ids.shape[1]  # [P]
        weights = topk_weights.reshape(-1).index_select(0, order)  # [P]
        rows = x.index_select(0, tokens)  # [P, H]
        gate_up = x.new_empty(rows.shape[0], w13.shape[1])  # [P, 2I]
        p13 = _through_experts(rows, runs, w13, a13, b13, scaling, out=gate_up)  # [P, r]
        gate, up = gate_up.chunk(2, dim=1)
        p2 = _through_experts(F.silu(gate).mul_(up), runs, w2, a2, b2, scaling, out=rows)  # rows: now y [P, H]
        acc = torch.promote_types(x.dtype, torch.float32)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
        out.index_add_(0, tokens, rows.to(acc).mul_(weights.to(acc)[:, None]))
        ctx.save_for_backward(x, topk_weights, order, tokens, weights, gate_up, p13, p2, w13, w2, a13, b13, a2, b2)
        ctx.runs, ctx.scaling = runs, scaling
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable  # a hand-written backward: no graph of its own to differentiate again
    def backward(ctx, grad_out):
        x, topk_weights, order, tokens, weights, gate_up, p13, p2, w13, w2, a13, b13, a2, b2 = ctx.saved_tensors
        runs, scaling, need = ctx.runs, ctx.scaling, ctx.needs_input_grad
        g_w13, g_w2, g_a13, g_b13, g_a2, g_b2 = (torch.zeros_like(t) if need[i] else None for i, t in
                                                 ((3, w13), (4, w2), (7, a13), (8, b13), (9, a2), (10, b2)))
        w = weights.to(x.dtype)[:, None]  # [P, 1]
        rows = grad_out.to(x.dtype).index_select(0, tokens)  # [P, H] the output's gradient, before the weight
        gate, up = gate_up.chunk(2, dim=1)
        silu = F.silu(gate)
        act = silu * up  # [P, I]
        u = torch.empty_like(act)  # [P, I] d loss / d act, before the weight
        _back_through_experts(rows, act, p2, runs, w2, a2, b2, scaling, w, u, g_w2, g_a2, g_b2)
        g_weights = None
        if need[1]:
            per_pair = (u.float() * act.float()).sum(1)  # [P] = <output gradient, expert output>
            g_weights = per_pair.new_zeros(topk_weights.numel()).index_copy_(0, order, per_pair)
            g_weights = g_weights.view(topk_weights.shape).to(topk_weights.dtype)
        u.mul_(w)  # now d loss / d act
        g_gate_up = torch.empty_like(gate_up)  # [P, 2I]
        g_gate, g_up = g_gate_up.chunk(2, dim=1)
        torch.mul(u, silu, out=g_up)
        torch.ops.aten.silu_backward.grad_input(u.mul_(up), gate, grad_input=g_gate)
        g_x = None
        if need[0] or any(t is not None for t in (g_w13, g_a13, g_b13)):
            xs = torch.index_select(x, 0, tokens, out=rows)  # [P, H], into the dead gradient rows
            g_xs = torch.empty_like(xs) if need[0] else None
            _back_through_experts(g_gate_up, xs, p13, runs, w13, a13, b13, scaling, None, g_xs, g_w13, g_a13, g_b13)
            if need[0]:
                g_x = torch.zeros_like(x).index_add_(0, tokens, g_xs)
        return g_x, g_weights, None, g_w13, g_w2, None, None, g_a13, g_b13, g_a2, g_b2


def apply_lora(model: MoECausalLM, *, rank: int, alpha: float, targets: Sequence[str],
               experts: Mapping[int, Sequence[int]] | None = None, dropout: float = 0.0) -> dict[str, nn.Parameter]:
    """Freezes every weight of `model` and adds LoRA where `targets` say (routed_experts, shared_experts,
    attention). `experts`: {MoE layer: chosen experts} (default: all of them). Returns the trainable
    parameters by name. The router (gate weights, correction bias) gets nothing, by construction."""
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(model.model.layers):
        if "attention" in targets:
            attn = layer.self_attn
            for name in ATTENTION_PROJECTIONS:
                if isinstance(getattr(attn, name, None), nn.Linear):
                    setattr(attn, name, LoraLinear(getattr(attn, name), rank, alpha, dropout))
        block = layer.mlp
        if not isinstance(block, MoEBlock):
            continue
        if "shared_experts" in targets and block.shared_experts is not None:
            for name in SHARED_PROJECTIONS:
                setattr(block.shared_experts, name,
                        LoraLinear(getattr(block.shared_experts, name), rank, alpha, dropout))
        if "routed_experts" in targets:
            chosen = list(range(block.experts.w13.shape[0])) if experts is None else list(experts.get(i, ()))
            if chosen:  # the local backend calls block.experts, which is now this
                block.experts = ExpertLora(block.experts, chosen, rank, alpha)
    trainable = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable
