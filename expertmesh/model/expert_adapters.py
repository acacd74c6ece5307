"""Routed-expert LoRA read from a peft adapter, and held per expert replica where the experts are sharded.

`expert_updates` turns one MoE block's peft tensors (A [E * r, in], B [out, r * E], see `peft_format`) into
per-expert A and B for the experts the adapter actually adapts (peft writes zeros for the others).

`HeldExpertLora` is what an expert shard of the actor graph keeps: for each adapter slot, the updates of the
(layer, expert) replicas the shard holds, and per layer the compact stacks the fused MoE LoRA kernel reads
(`index` [S, E] naming each adapted (slot, expert) pair's row, -1 elsewhere). What the shard holds changes
with the placement: `prepare(holding)` reads the updates of new replicas from each slot's adapter directory
(loaded by name, as their expert weights are) and builds the stacks off the step path; `install` swaps them
in. Its tensors are never written in place once built, so a request reading them needs no lock of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from expertmesh.model.peft_format import PeftAdapter, read_peft_adapter

Expert = tuple[int, int]  # (layer, expert)
Updates = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # A13 [r, H], B13 [2I, r], A2 [r, I], B2 [H, r]


def expert_updates(adapter: PeftAdapter, block_path: str, *, num_experts: int, two_i: int, hidden: int, inter: int,
                   max_rank: int) -> tuple[list[int], Updates]:
    """(the experts the adapter adapts in block `block_path`, their (A13 [n, r, H], B13 [n, 2I, r], A2 [n, r, I],
    B2 [n, H, r]) unscaled). ValueError naming the block when the shapes do not fit `num_experts` experts of
    these sizes or the rank exceeds `max_rank`."""
    shapes = {"w13": (two_i, hidden), "w2": (hidden, inter)}  # (out, in)
    per_expert = {}  # which -> (A [E, r, in], B [E, out, r])
    for which, (a, b) in adapter.experts[block_path].items():
        out_features, in_features = shapes[which]
        rank = a.shape[0] // num_experts
        if (tuple(a.shape) != (num_experts * rank, in_features) or tuple(b.shape) != (out_features, rank * num_experts)
                or not rank):
            raise ValueError(f"{adapter.path}: {block_path}.experts ({which}): adapter shapes {tuple(a.shape)}, "
                             f"{tuple(b.shape)} do not fit {num_experts} experts of {in_features} -> {out_features}")
        if rank > max_rank:
            raise ValueError(f"{adapter.path}: {block_path}.experts: rank {rank} exceeds max_lora_rank={max_rank}")
        per_expert[which] = (a.reshape(num_experts, rank, in_features),
                             b.reshape(out_features, rank, num_experts).permute(2, 0, 1))
    for which, (out_features, in_features) in shapes.items():  # one side not adapted: zeros
        per_expert.setdefault(which, (torch.zeros(num_experts, 1, in_features), torch.zeros(num_experts, out_features, 1)))
    adapted = torch.zeros(num_experts, dtype=torch.bool)
    for a, b in per_expert.values():  # an expert whose update is zero is not adapted
        adapted |= a.flatten(1).any(1) & b.flatten(1).any(1)
    chosen = adapted.nonzero().squeeze(1).tolist()
    a13, b13 = per_expert["w13"]
    a2, b2 = per_expert["w2"]
    return chosen, (a13[chosen], b13[chosen], a2[chosen], b2[chosen])


def block_layer(adapter: PeftAdapter, block_path: str) -> int:
    """The decoder layer of a block path `model.layers.<i>.mlp`; ValueError for any other path."""
    head, _, tail = block_path.partition("model.layers.")
    index, _, rest = tail.partition(".")
    if head or rest != "mlp" or not index.isdigit():
        raise ValueError(f"{adapter.path}: the adapter adapts routed experts of {block_path}, which is not an MoE "
                         "block of this model")
    return int(index)


@dataclass(frozen=True)
class LayerLora:
    """One layer's adapted (slot, expert) pairs as stacks: row `index[s, e]` of A13 [N, r, H], B13 [N, 2I, r],
    A2 [N, r, I], B2 [N, H, r] (scaled; B held [N, r, out] in memory)."""

    index: torch.Tensor  # [S, E] int64
    a13: torch.Tensor
    b13: torch.Tensor
    a2: torch.Tensor
    b2: torch.Tensor
    slots: frozenset[int]


class HeldExpertLora:
    def __init__(self, *, num_slots: int, max_rank: int, num_experts: int, moe_layers: Iterable[int], hidden: int,
                 two_i: int, inter: int, dtype: torch.dtype, device: torch.device):
        self.num_slots, self.max_rank, self.num_experts = num_slots, max_rank, num_experts
        self.moe_layers = frozenset(moe_layers)
        self.sizes = {"hidden": hidden, "two_i": two_i, "inter": inter}
        self.dtype, self.device = dtype, device
        self.paths: dict[int, str] = {}  # slot -> the adapter directory it holds
        self.updates: dict[int, dict[Expert, Updates]] = {}  # slot -> held replica -> its scaled update
        self.layers: dict[int, LayerLora] = {}  # layers with at least one adapted replica

    def check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"adapter slot {slot} is outside [0, {self.num_slots}): max_loras={self.num_slots}")

    def read(self, path: str | Path, experts: Iterable[Expert]) -> dict[Expert, Updates]:
        """The scaled updates the adapter at `path` has for `experts` (those it adapts), every block of the
        adapter checked against this model first: ValueError naming what does not fit."""
        adapter = read_peft_adapter(path)
        wanted = set(experts)
        out: dict[Expert, Updates] = {}
        cast = lambda t, scale=1.0: (t * scale).to(self.dtype).to(self.device)  # noqa: E731
        for block_path in adapter.experts:
            layer = block_layer(adapter, block_path)
            if layer not in self.moe_layers:
                raise ValueError(f"{adapter.path}: the adapter adapts routed experts of {block_path}, which is not an "
                                 "MoE block of this model")
            chosen, (a13, b13, a2, b2) = expert_updates(adapter, block_path, num_experts=self.num_experts,
                                                        max_rank=self.max_rank, **self.sizes)
            for row, e in enumerate(chosen):
                if (layer, e) in wanted:
                    out[layer, e] = (cast(a13[row]), cast(b13[row], adapter.scaling), cast(a2[row]),
                                     cast(b2[row], adapter.scaling))
        return out

    def load(self, slot: int, path: str | Path, held: Iterable[Expert]) -> None:
        """Puts the adapter at `path` into `slot` for the replicas `held`; the slot is unchanged on error."""
        self.check_slot(slot)
        updates = self.read(path, held)
        self.paths[slot], self.updates[slot] = str(path), updates
        self.layers = self.build(self.updates)

    def clear(self, slot: int) -> None:
        self.check_slot(slot)
        self.paths.pop(slot, None)
        if self.updates.pop(slot, None):
            self.layers = self.build(self.updates)

    def prepare(self, holding: Iterable[Expert]) -> tuple[dict[int, str], dict[int, dict[Expert, Updates]],
                                                           dict[int, LayerLora]]:
        """(paths, updates, layers) for the replicas of `holding`: updates of replicas already held are kept,
        those of new ones read from each slot's adapter directory."""
        holding = set(holding)
        paths, updates = dict(self.paths), {}
        for slot, path in paths.items():
            kept = {x: u for x, u in self.updates.get(slot, {}).items() if x in holding}
            new = holding - set(self.updates.get(slot, {}))
            updates[slot] = {**kept, **(self.read(path, new) if new else {})}
        return paths, updates, self.build(updates)

    def install(self, prepared: tuple[dict[int, str], dict[int, dict[Expert, Updates]], dict[int, LayerLora]]) -> None:
        self.paths, self.updates, self.layers = prepared

    def build(self, updates: dict[int, dict[Expert, Updates]]) -> dict[int, LayerLora]:
        """Per layer, the stacks of every (slot, held replica) pair an adapter adapts."""
        by_layer: dict[int, list[tuple[int, int, Updates]]] = {}
        for slot, per_expert in updates.items():
            for (layer, e), u in per_expert.items():
                by_layer.setdefault(layer, []).append((slot, e, u))
        r, h, two_i, inter = self.max_rank, self.sizes["hidden"], self.sizes["two_i"], self.sizes["inter"]
        out = {}
        for layer, pairs in by_layer.items():
            n = len(pairs)
            index = torch.full((self.num_slots, self.num_experts), -1, dtype=torch.int64, device=self.device)
            new = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
            a13, a2 = new(n, r, h), new(n, r, inter)
            b13, b2 = new(n, r, two_i).transpose(1, 2), new(n, r, h).transpose(1, 2)  # [N, out, r] views
            for row, (slot, e, (ua13, ub13, ua2, ub2)) in enumerate(pairs):
                index[slot, e] = row
                a13[row, : ua13.shape[0]], b13[row, :, : ub13.shape[1]] = ua13, ub13
                a2[row, : ua2.shape[0]], b2[row, :, : ub2.shape[1]] = ua2, ub2
            out[layer] = LayerLora(index, a13, b13, a2, b2, frozenset(slot for slot, _, _ in pairs))
        return out
