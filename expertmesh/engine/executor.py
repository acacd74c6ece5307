"""The executor seam: what the engine and the server need from whatever runs the model.

The engine hands a scheduled batch to an `Executor` and gets logits back; the server asks the same object
for the experts' load, the placement, health, what recovery did, and stops it. `LocalExecutor` runs the
model in this process; the actor graph (`expertmesh.graph`) provides another. The engine is given an
`ExecutorFactory` and never builds (or imports) the actor graph itself. An executor that also serves LoRA
adapters declares it by implementing `AdapterExecutor`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from expertmesh.engine.scheduler import ScheduledBatch
from expertmesh.experts import ExpertLoad, PlacementTable
from expertmesh.experts.rebalance_policy import RebalancePolicy
from expertmesh.experts.shard_autoscale import ShardAutoscalePolicy
from expertmesh.kernels.cpu_ext import small_m_kernels
from expertmesh.model import AttentionMetadata, MoECausalLM, load_model, resolve_dtype
from expertmesh.model.adapters import ModelAdapters
from expertmesh.model.moe import MoEBlock
from expertmesh.model.quantize import check_checkpoint_quantizable, quantize_model


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecutorSpec:
    """What the engine asks an executor factory to build: the checkpoint, its dtype, where the engine
    samples, the paged cache's size (blocks of `block_size` tokens), and how many LoRA adapters of rank up to
    `max_lora_rank` it keeps resident (0: none)."""

    model: str
    dtype: str
    device: str
    num_blocks: int
    block_size: int
    max_loras: int = 0
    max_lora_rank: int = 16
    quantization: str | None = None  # "int8", "w8a8" or "experts_int8" (model/quantize.py)
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; or a dtype name ("bfloat16")
    activation_dtype: str = "auto"  # "auto": the model's dtype; "float32" over bf16 weights (model/loader.py)


class ExecutorUnavailable(RuntimeError):
    """The part of an executor that answers a question (the router actor, say) did not answer in time."""


class Executor(Protocol):
    device: torch.device  # where logits come back, so the sampler runs there
    mode: str  # for operators: "local", "actor graph (grpc, 3 shards)", ...
    placement: PlacementTable  # the placement the current steps run with
    recoveries: Sequence[str]  # what recovery has done, oldest first

    def execute(self, batch: ScheduledBatch, *, all_logits: bool = False) -> torch.Tensor:
        """Logits [N, V] float32: one row per sequence of `batch.sample_mask`, or with `all_logits` one row
        per scheduled token."""
        ...

    def load_counts(self, window: bool = False) -> dict[int, list[int]]:
        """(token, expert) pairs routed to each expert per MoE layer: since the start, or over the recent
        window. Raises ExecutorUnavailable when the part that counts does not answer in time."""
        ...

    def health(self) -> list[str]:
        """What is wrong, one line each; [] when every part answers and recent steps succeed."""
        ...

    def shutdown(self) -> None: ...


@runtime_checkable
class AdapterExecutor(Protocol):
    """An executor that serves LoRA adapters: each sequence's `adapter_slot` (-1: none) picks the adapter its
    tokens run with. Which adapter a slot holds is the engine's business (its adapters registry)."""

    def load_adapter(self, slot: int, path: str) -> None:
        """Puts the peft adapter directory `path` into `slot`, replacing what it held; ValueError naming what
        does not fit this model (and the slot keeps what it held)."""
        ...


@runtime_checkable
class PlacementExecutor(Protocol):
    """An executor whose routed experts live on shards it can re-place while serving (the actor graph): a
    new placement's replicas load beside the ones in use and the swap happens between two steps."""

    rebalance_policy: RebalancePolicy  # the slots each shard has, and when a rebalance is worth a swap
    autoscale_policy: ShardAutoscalePolicy  # how many shards, between which bounds, by which rules

    def set_placement(self, table: PlacementTable, *, wait: bool = True,
                      timeout_s: float | None = None) -> PlacementTable:
        """Starts the swap to `table` (with `wait`, returns once its replicas are loaded); returns it with the
        version it takes effect under. ValueError while another swap is pending."""
        ...

    def placement_pending(self) -> int | None:
        """The version of the swap under way (loading, or waiting for a step boundary), or None."""
        ...

    def placement_swaps(self) -> list[dict]:
        """Every swap tried, oldest first: version, when, outcome, replicas loaded and dropped."""
        ...

    def add_expert_shards(self, count: int, table: PlacementTable | None = None) -> None:
        """Starts `count` more shards holding their part of `table` (or nothing), ready for a placement that
        names them (`set_placement` of a table with more shards starts them itself; a placement with fewer
        shards swapped in ends those past its count)."""
        ...

    def expert_step_timings(self, clear: bool = False) -> list[tuple[float, float, float]]:
        """(step seconds, waiting for hidden states, dispatching to the shards) of recent steps."""
        ...


ExecutorFactory = Callable[[ExecutorSpec], Executor]


class LocalExecutor:
    """Owns the model, its paged KV cache and its resident LoRA adapters (`max_loras` slots), and counts the
    tokens routed to each expert. Every expert lives here: the placement is one shard holding them all."""

    mode = "local"

    def __init__(self, model: MoECausalLM, *, num_blocks: int, block_size: int, max_loras: int = 0,
                 max_lora_rank: int = 16, kv_cache_dtype: str = "auto"):
        self.model = model
        self.adapters = ModelAdapters(model, max_loras, max_lora_rank)
        blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
        num_experts = model.config.routing.num_experts
        moe_layers = [b.layer_idx for b in blocks]
        self.load = ExpertLoad(moe_layers, num_experts)
        self._routed: list[tuple[int, torch.Tensor]] = []  # (load row, expert ids [T, K]) of the step under way
        self.placement = PlacementTable.balanced(sorted(moe_layers), num_experts, 1)
        self.recoveries: list[str] = []  # nothing to recover in one process
        for block in blocks:
            block.routing_observer = self._observe_routing
        self.block_size = block_size
        cache_dtype = None if kv_cache_dtype == "auto" else resolve_dtype(kv_cache_dtype)
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size, cache_dtype)
        self.device = model.model.embed_tokens.weight.device
        if self.device.type == "cpu":
            small_m_kernels()  # build the C++ decode kernels now rather than during the first request

    @classmethod
    def build(cls, spec: ExecutorSpec) -> LocalExecutor:
        """The default executor factory: loads the whole model on `spec.device`."""
        if spec.quantization is not None:
            check_checkpoint_quantizable(spec.model, spec.quantization)
        model = load_model(spec.model, spec.dtype, spec.device, activation_dtype=spec.activation_dtype)
        if spec.quantization is not None:
            quantize_model(model, spec.quantization)
        return cls(model, num_blocks=spec.num_blocks, block_size=spec.block_size, max_loras=spec.max_loras,
                   max_lora_rank=spec.max_lora_rank, kv_cache_dtype=spec.kv_cache_dtype)

    def load_adapter(self, slot: int, path: str) -> None:
        self.adapters.load(slot, path)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, *, all_logits: bool = False) -> torch.Tensor:
        input_ids, query_lens, context_lens, tables, slots = [], [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
            slots.append(seq.adapter_slot)
        meta = AttentionMetadata.build(
            query_lens=query_lens, context_lens=context_lens, block_tables=tables,
            block_size=self.block_size, device=self.device,
        )
        if all_logits or (len(input_ids) == len(query_lens) and all(batch.sample_mask)):
            logits_indices = None  # every row is wanted (a decode step: one row a sequence, each sampled)
        else:
            ends = torch.tensor(query_lens).cumsum(0) - 1  # last row of each sequence
            logits_indices = ends[torch.tensor(batch.sample_mask, dtype=torch.bool)].to(self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        token_slots = None  # no sequence has an adapter: the model runs as it would without any
        if max(slots) >= 0:  # [T] int64, each token its sequence's slot
            token_slots = torch.repeat_interleave(torch.tensor(slots), torch.tensor(query_lens)).to(self.device)
        try:
            with self.adapters.serving(token_slots):
                logits = self.model(ids, meta, self.kv_caches, logits_indices)
        finally:
            routed, self._routed = self._routed, []
        self.load.add_all(self._count(routed))
        self.load.finish_step()
        return logits

    def _observe_routing(self, layer_idx: int, topk_ids: torch.Tensor) -> None:
        """Keeps a layer's routing decisions [T, K], counted once at the end of the step."""
        self._routed.append((self.load.row(layer_idx), topk_ids))

    def _count(self, routed: list[tuple[int, torch.Tensor]]) -> np.ndarray:
        """[MoE layers, experts] (token, expert) pairs of a step's routing decisions, in one numpy bincount (a
        torch count per layer as it ran cost ~30 us a layer at batch 1; one torch bincount over them all, 24 us a
        step of `small`; this, 13)."""
        num_experts, rows = self.load.num_experts, len(self.load.moe_layers)
        if not routed:
            return np.zeros((rows, num_experts), dtype=np.int64)
        flat = np.concatenate([ids.cpu().numpy().reshape(-1) + row * num_experts for row, ids in routed])
        return np.bincount(flat, minlength=rows * num_experts).reshape(rows, num_experts)

    def load_counts(self, window: bool = False) -> dict[int, list[int]]:
        return self.load.counts(window)

    def health(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        pass


def count_routed(topk_ids: torch.Tensor, num_experts: int) -> np.ndarray:
    """(token, expert) pairs per expert of one layer's routing decisions [T, K]: [E] int64."""
    return torch.bincount(topk_ids.reshape(-1).cpu(), minlength=num_experts).numpy()
