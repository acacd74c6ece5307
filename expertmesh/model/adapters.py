"""LoRA adapters served side by side: up to `max_loras` slots of adapter weights on one model, each token of a
step updated by the adapter in its sequence's slot.

An adapted linear layer of the decoder holds A [S, r_max, in] and B [S, out, r_max], zero past an adapter's
rank, with peft's scaling alpha / r folded into B: a row of slot s gains x A[s]^T B[s]^T, for all rows at once
(`kernels.lora_shrink` / `lora_expand`, each row its slot's A and B). Routed experts hold only the (slot,
expert) pairs an adapter adapts, as rows of compact stacks named by `index` [S, E] (-1: the expert is left
alone); the fused MoE kernel adds each adapted (token, expert) pair's update to its gate/up projection before
the activation and to its down projection (`kernels.fused_moe_lora`), so no expert runs twice.
B stacks are held [., r, out] in memory and handed out as [., out, r] views: the CPU expand then reads B one
contiguous rank row at a time.

MLA's kv_b_proj reads cached latents rather than this step's rows, so MLA applies it per sequence: the update
of the chunk's slot in prefill, and merged weights W + B[s] A[s] for each slot's rows in the absorbed decode.

The executor names each step's token slots with `ModelAdapters.serving`; in a step where no token has a slot,
nothing is set and every hook returns at its first test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh import kernels
from expertmesh.model.decoder import MoECausalLM
from expertmesh.model.expert_adapters import expert_updates
from expertmesh.model.layers import Linear
from expertmesh.model.mla import MLAttention
from expertmesh.model.moe import MoEBlock, RoutedExperts
from expertmesh.model.peft_format import PeftAdapter, read_peft_adapter

Write = Callable[[int], None]  # puts one checked update into a slot


def slot_groups(slots: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """(positions of `slots` [n] sorted by slot [n]; (slot, its positions) for each slot present, -1 included,
    the positions being consecutive pieces of the first): three tensor ops whatever the number of slots."""
    order = torch.argsort(slots, stable=True)  # [n]
    present, counts = torch.unique_consecutive(slots[order], return_counts=True)
    return order, list(zip(present.tolist(), order.split(counts.tolist())))


def b_stack(like: torch.Tensor, n: int, out_features: int, rank: int) -> torch.Tensor:
    """Zeros [n, out, r] held [n, r, out] in memory (see the module's docstring)."""
    return like.new_zeros(n, rank, out_features).transpose(1, 2)


class AdapterBatch:
    """One forward's adapter slot per token, and which slots it holds."""

    __slots__ = ("token_slots", "present", "_rows")

    def __init__(self, token_slots: torch.Tensor):
        self.token_slots = token_slots  # [T] int64, -1: the base model
        self.present = frozenset(s for s in torch.unique(token_slots).tolist() if s >= 0)
        self._rows: dict[frozenset[int], torch.Tensor] = {}

    def rows_for(self, slots: frozenset[int]) -> torch.Tensor:
        """[T] each token's slot if it is among `slots` (those that adapt a layer), else -1: the kernels then
        skip tokens whose slot leaves the layer alone. One tensor per distinct set and forward."""
        if self.present <= slots:
            return self.token_slots
        rows = self._rows.get(slots)
        if rows is None:
            keep = torch.tensor(sorted(self.present & slots), dtype=self.token_slots.dtype,
                                device=self.token_slots.device)
            rows = self._rows[slots] = self.token_slots.masked_fill(~torch.isin(self.token_slots, keep), -1)
        return rows


class AdapterContext(threading.local):
    """What the hooks of one model read: the batch of the forward running now (None: no adapter in it), per
    thread, so forwards on two threads (an attention actor's micro-batches) each see their own."""

    def __init__(self) -> None:
        self.batch: AdapterBatch | None = None

    def serves(self, slots: frozenset[int]) -> bool:
        """Whether a token of the forward running now has one of `slots`."""
        return self.batch is not None and not self.batch.present.isdisjoint(slots)


class LinearAdapters:
    """One linear layer's updates by slot: A [S, r, in] and B [S, out, r], the scaling folded into B."""

    def __init__(self, base: nn.Linear, context: AdapterContext, num_slots: int, max_rank: int):
        self.context = context
        self.a = base.weight.new_zeros(num_slots, max_rank, base.in_features)  # [S, r, in]
        self.b = b_stack(base.weight, num_slots, base.out_features, max_rank)  # [S, out, r]
        self.slots: frozenset[int] = frozenset()  # the slots that adapt this layer
        self._merged: dict[int, torch.Tensor] = {}  # slot -> W + B A, built by `by_slot` on first use

    def set(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        self.clear(slot)
        self.a[slot, : a.shape[0]] = a
        self.b[slot, :, : b.shape[1]] = b * scaling
        self.slots |= {slot}

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.slots -= {slot}
        self._merged.pop(slot, None)

    def delta(self, x: torch.Tensor, slot: int) -> torch.Tensor:  # [n, in] -> [n, out]
        return F.linear(F.linear(x, self.a[slot]), self.b[slot])

    @property
    def in_use(self) -> bool:
        return self.context.serves(self.slots)

    def add_rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`Linear.forward`'s hook: y [T, out] of this forward's rows x [T, in], plus each row's update."""
        if not self.in_use:
            return y
        batch = self.context.batch
        assert x.shape[0] == batch.token_slots.shape[0], "a row hook on a layer that does not see the batch's rows"
        rows = batch.rows_for(self.slots)  # [T]
        return kernels.lora_expand(y, kernels.lora_shrink(x, self.a, rows), self.b, rows)

    def slot_of(self, row: int) -> int:
        """The slot of this forward's token `row` if it adapts this layer, else -1."""
        batch = self.context.batch
        slot = -1 if batch is None else int(batch.token_slots[row])
        return slot if slot in self.slots else -1

    def by_slot(self, rows: torch.Tensor, base_weight: torch.Tensor,
                fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn(sel, weight) for each group of `rows` (this forward's tokens) sharing a slot, `weight` being this
        layer's [out, in] `base_weight` merged with the slot's update; the results [len(sel), ...] assembled in
        row order.

        A slot's merged weight is kept until the slot changes: rebuilt every step, the merges cost ~10 ms of a
        ~130 ms batch-32 decode step with 4 adapters on `small` (1 thread of the 2-core CPU; 0.14-0.22 ms per
        slot and layer). The price is one copy of the layer's weight per slot that adapts it (1.5 MB per layer
        on `small`, fp32). `base_weight` must stay the same while the adapters serve (the model's frozen
        weight)."""
        assert self.context.batch is not None and len(rows) > 0
        order, groups = slot_groups(self.context.batch.token_slots[rows])
        parts = [fn(sel, self._merged_weight(slot, base_weight)) for slot, sel in groups]
        if len(parts) == 1:  # one slot: `order` is the identity
            return parts[0]
        ordered = torch.cat(parts)  # [n, ...] rows in `order`
        return torch.empty_like(ordered).index_copy_(0, order, ordered)

    def _merged_weight(self, slot: int, base_weight: torch.Tensor) -> torch.Tensor:
        if slot not in self.slots:
            return base_weight
        weight = self._merged.get(slot)
        if weight is None:
            weight = self._merged[slot] = torch.addmm(base_weight, self.b[slot], self.a[slot])
        return weight


class RoutedExpertAdapters:
    """One MoE layer's routed-expert updates. Only adapted (slot, expert) pairs hold weights: `index` [S, E]
    names their row of the stacks A13 [N, r, H], B13 [N, 2I, r], A2 [N, r, I], B2 [N, H, r] (scaled)."""

    def __init__(self, experts: RoutedExperts, context: AdapterContext, num_slots: int, max_rank: int):
        w13 = experts.w13
        num_experts, two_i, hidden = w13.shape
        inter = experts.w2.shape[2]
        self.context = context
        self.index = torch.full((num_slots, num_experts), -1, dtype=torch.int64, device=w13.device)
        self.a13, self.b13 = w13.new_zeros(0, max_rank, hidden), b_stack(w13, 0, two_i, max_rank)
        self.a2, self.b2 = w13.new_zeros(0, max_rank, inter), b_stack(w13, 0, hidden, max_rank)
        self.slots: frozenset[int] = frozenset()  # the slots that adapt some expert of this layer
        self._free: list[int] = []  # rows of the stacks no pair uses

    @property
    def num_rows(self) -> int:
        """Rows in use: adapted (slot, expert) pairs."""
        return int((self.index >= 0).sum())

    @property
    def in_use(self) -> bool:
        return self.context.serves(self.slots)

    def set(self, slot: int, experts: list[int], updates: tuple[torch.Tensor, ...], scaling: float) -> None:
        """Slot `slot` adapts `experts`; `updates` = (A13, B13, A2, B2), one entry per expert in that order."""
        self.clear(slot)
        if not experts:
            return
        rows = self._take(len(experts))
        a13, b13, a2, b2 = updates
        self.a13[rows, : a13.shape[1]], self.b13[rows, :, : b13.shape[2]] = a13, b13 * scaling
        self.a2[rows, : a2.shape[1]], self.b2[rows, :, : b2.shape[2]] = a2, b2 * scaling
        self.index[slot, experts] = torch.tensor(rows, device=self.index.device)
        self.slots |= {slot}

    def clear(self, slot: int) -> None:
        rows = self.index[slot][self.index[slot] >= 0].tolist()
        for stack in (self.a13, self.b13, self.a2, self.b2):
            stack[rows] = 0
        self._free.extend(rows)
        self.index[slot] = -1
        self.slots -= {slot}

    def _take(self, n: int) -> list[int]:
        if len(self._free) < n:  # grow every stack by the rows missing, B in its [N, r, out] layout
            start, grow = self.a13.shape[0], n - len(self._free)
            self.a13, self.a2 = (torch.cat([t, t.new_zeros(grow, *t.shape[1:])]) for t in (self.a13, self.a2))
            self.b13, self.b2 = (torch.cat([t.transpose(1, 2), t.new_zeros(grow, t.shape[2], t.shape[1])])
                                 .transpose(1, 2) for t in (self.b13, self.b2))
            self._free.extend(range(start, start + grow))
        self._free.sort()
        rows, self._free = self._free[:n], self._free[n:]
        return rows

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
        """`RoutedExperts.forward` while `in_use`: the routed output [T, H]."""
        slots = self.context.batch.token_slots  # [T]
        assert x.shape[0] == slots.shape[0], "routed experts must see every token of the batch"
        rows = kernels.expert_lora_rows(self.index, slots, topk_ids)  # [T, K] each pair's stack row, -1: none
        return kernels.fused_moe_lora(x, w13, w2, topk_weights, topk_ids, rows, self.a13, self.b13, self.a2,
                                      self.b2)


class ModelAdapters:
    """Up to `num_slots` LoRA adapters resident on one model, loaded from peft directories into slots; what a
    slot holds is the engine's business (its adapters registry)."""

    def __init__(self, model: MoECausalLM, num_slots: int, max_rank: int, *, routed: bool = True):
        self.model, self.num_slots, self.max_rank = model, num_slots, max_rank
        self.routed = routed  # False: the model has no routed experts (an attention actor's); shards adapt them
        self.context = AdapterContext()
        self.linears: dict[str, LinearAdapters] = {}  # by module path, MLA's kv_b_proj included
        self.experts: dict[str, RoutedExpertAdapters] = {}  # by MoE block path

    @contextmanager
    def serving(self, token_slots: torch.Tensor | None) -> Iterator[None]:
        """Applies each token's adapter (token_slots [T] int64, -1: none; None: no adapter at all) to the
        forward passes run inside."""
        if token_slots is None:
            yield
            return
        self.context.batch = AdapterBatch(token_slots)
        try:
            yield
        finally:
            self.context.batch = None

    def load(self, slot: int, adapter_dir: str | Path) -> None:
        """Puts the peft adapter at `adapter_dir` into `slot`, replacing what it held. Everything is checked
        first: a ValueError names what does not fit (rank, a module this model lacks, a shape), and leaves
        the slot as it was."""
        self._check_slot(slot)
        adapter = read_peft_adapter(adapter_dir)
        self._check_rank(adapter, "the adapter", adapter.rank)
        writes = [self._linear(adapter, path, a, b) for path, (a, b) in adapter.linears.items()]
        writes += [self._experts(adapter, path) for path in adapter.experts]
        self.clear(slot)
        for write in writes:
            write(slot)

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for holder in (*self.linears.values(), *self.experts.values()):
            holder.clear(slot)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"adapter slot {slot} is outside [0, {self.num_slots}): max_loras={self.num_slots}")

    def _check_rank(self, adapter: PeftAdapter, what: str, rank: int) -> None:
        if rank > self.max_rank:
            raise ValueError(f"{adapter.path}: {what}: rank {rank} exceeds max_lora_rank={self.max_rank}")

    def _module(self, adapter: PeftAdapter, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{adapter.path}: the adapter adapts {path}, which this model does not have") from None

    def _linear(self, adapter: PeftAdapter, path: str, a: torch.Tensor, b: torch.Tensor) -> Write:
        module = self._module(adapter, path)
        if not isinstance(module, Linear):
            raise ValueError(f"{adapter.path}: the adapter adapts {path}, which is not a linear layer here")
        if not path.startswith("model.layers."):  # the LM head sees only the sampled rows
            raise ValueError(f"{adapter.path}: the adapter adapts {path}; only the decoder layers' linear layers "
                             "are served with adapters")
        rank = a.shape[0]
        if tuple(a.shape) != (rank, module.in_features) or tuple(b.shape) != (module.out_features, rank):
            raise ValueError(f"{adapter.path}: {path}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                             f"a {module.in_features} -> {module.out_features} layer")
        self._check_rank(adapter, path, rank)
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        weight = module.weight

        def write(slot: int) -> None:
            holder = self.linears.get(path)
            if holder is None:
                holder = self.linears[path] = LinearAdapters(module, self.context, self.num_slots, self.max_rank)
                if isinstance(parent, MLAttention) and name == "kv_b_proj":  # reads cached latents: MLA applies it
                    parent.kv_b_adapters = holder
                else:
                    module.adapters = holder
            holder.set(slot, a.to(weight), b.to(weight), adapter.scaling)

        return write

    def _experts(self, adapter: PeftAdapter, block_path: str) -> Write:
        block = self._module(adapter, block_path)
        if not isinstance(block, MoEBlock) or (self.routed and not isinstance(block.experts, RoutedExperts)):
            raise ValueError(f"{adapter.path}: the adapter adapts routed experts of {block_path}, which has none here")
        if not self.routed:  # the expert shards hold and check these
            return lambda slot: None
        experts = block.experts
        num, two_i, hidden = experts.w13.shape
        weight = experts.w13
        chosen, updates = expert_updates(adapter, block_path, num_experts=num, two_i=two_i, hidden=hidden,
                                         inter=experts.w2.shape[2], max_rank=self.max_rank)
        tensors = tuple(t.to(weight) for t in updates)

        def write(slot: int) -> None:
            holder = self.experts.get(block_path)
            if holder is None:
                holder = self.experts[block_path] = RoutedExpertAdapters(experts, self.context, self.num_slots,
                                                                   self.max_rank)
                experts.adapters = holder
            holder.set(slot, chosen, tensors, adapter.scaling)

        return write
