"""LoRA on our model, expert-aware: low-rank updates on the attention projections, the shared experts and the
routed experts chosen per layer (the others get no adapter weights, so no optimizer state either), with the
base weights frozen and the router untouched.

The update is peft's: y = W x + (alpha / r) B A x, A initialised as peft does (Kaiming-uniform) and B at
zero, so training starts from the base model. `peft_format.py` writes and reads the adapters in peft's own
layout, so transformers + peft load what we train and we load what peft trains."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


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
    another shard computes) are skipped. Local mode and the expert shards in training both call this."""
    a13, b13, a2, b2 = adapters
    intermediate = w2.shape[2]
    top_k = topk_ids.shape[1]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    flat = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1)
    for expert in torch.unique(flat).tolist():
        if expert < 0:
            continue
        pairs = (flat == expert).nonzero().squeeze(1)  # [n] pair indices
        tokens = pairs // top_k
        x_e = x[tokens]
        gate_up = x_e @ w13[expert].t()
        s = int(slot[expert])
        if s >= 0:
            gate_up = gate_up + (x_e @ a13[s].t()) @ b13[s].t() * scaling
        act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        y = act @ w2[expert].t()
        if s >= 0:
            y = y + (act @ a2[s].t()) @ b2[s].t() * scaling
        out = out.index_add(0, tokens, y.to(out.dtype) * flat_weights[pairs, None].to(out.dtype))
    return out.to(x.dtype)


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
