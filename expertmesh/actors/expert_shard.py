"""An expert shard: some (layer, expert) pairs' weights and the math on them.

`ExpertShard` is the runtime, usable in any process: it loads only its experts from the checkpoint and
answers one layer's request (hidden states, the logical expert ids routed to it, routing weights) with the
weighted sum of its experts' outputs per token. It checks every request against what it holds and the
placement version it is on, and names what does not match. What it holds changes between steps in two
moves: `stage` loads new replicas by name beside the ones in use and, told the whole new holding, stacks
the new layers' weights too (while steps go on); `commit` then swaps to them and the new version at once,
dropping what it no longer holds, so the step it runs between waits for a swap of references, not a copy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from expertmesh import kernels
from expertmesh.model import LayerExperts, load_experts, resolve_dtype
from expertmesh.model.loader import check_activation_dtype
from expertmesh.model.config import ModelConfig
from expertmesh.model.quantize import check_checkpoint_quantizable, check_quantization
from expertmesh.model.expert_adapters import HeldExpertLora

Expert = tuple[int, int]  # (layer, expert)
Replica = tuple[torch.Tensor, ...]  # one expert's rows of its layer's `LayerExperts.tensors`


class ShardRequestError(ValueError):
    """A data-plane request this shard cannot serve; the message says what did not match."""


class ExpertShard:
    def __init__(
        self,
        model_dir: str | Path,
        experts: Iterable[Expert],
        *,
        dtype: str | torch.dtype = "float32",
        shard_index: int = 0,
        placement_version: int = 0,
        device: str | torch.device = "cpu",
        max_loras: int = 0,
        max_lora_rank: int = 16,
        adapters: dict[int, str] | None = None,
        quantization: str | None = None,
        activation_dtype: str | torch.dtype | None = None,
    ):
        # Every quantisation of model/quantize.py makes the routed experts int8 (the attention actors quantise the
        # rest); "w8a8" quantises their activations too, where the sizes are multiples of the block.
        check_quantization(quantization)
        if quantization is not None:
            if max_loras:
                raise ValueError(f"max_loras with quantization={quantization!r} is not served: LoRA adapters "
                                 "apply to float expert weights")
            check_checkpoint_quantizable(model_dir, quantization)
        self.quantization = quantization
        config = ModelConfig.from_pretrained(model_dir)
        self.quantize_activations = (quantization == "w8a8" and config.hidden_size % kernels.Q8_BLOCK == 0
                                     and config.moe_intermediate_size % kernels.Q8_BLOCK == 0)
        self.model_dir = model_dir
        self.device = torch.device(device)
        self.shard_index = shard_index
        self.placement_version = placement_version
        self.weight_dtype = resolve_dtype(dtype)
        # the hidden states' dtype, in and out: float32 over bf16 weights under activation_dtype, whose matmuls
        # read their input rounded to bf16 (kernels.fused_moe_mixed), as local mode's do
        self.dtype = check_activation_dtype(self.weight_dtype, activation_dtype)
        self.hidden_size = config.hidden_size
        self.num_experts = config.routing.num_experts
        self._lock = threading.Lock()  # a request is served on one side of a commit, never across it
        self._staged: dict[Expert, Replica] = {}  # loaded, not yet in use
        self._prepared: tuple | None = None  # a holding, stacked: (experts, layers, adapters, adapter generation)
        self._lora_generation = 0  # counts adapter loads and clears: a holding prepared before one is stale
        self.pairs_served = 0  # (token, expert) pairs computed since start: where the router sends work
        self.last_compute_s = 0.0  # the last request's time on the expert math, reported to the router
        self._install(self._load(experts))
        # LoRA adapters of the routed experts held here, by slot (None: the graph serves no adapters)
        self.lora: HeldExpertLora | None = None
        if max_loras:
            self.lora = HeldExpertLora(
                num_slots=max_loras, max_rank=max_lora_rank, num_experts=self.num_experts,
                moe_layers=[i for i, moe in enumerate(config.moe_layers) if moe], hidden=config.hidden_size, two_i=2 * config.moe_intermediate_size,
                inter=config.moe_intermediate_size, dtype=self.weight_dtype, device=self.device)
            for slot, path in (adapters or {}).items():  # a replacement shard takes the adapters back
                self.load_adapter(slot, path)

    def _load(self, experts: Iterable[Expert]) -> dict[int, LayerExperts]:
        """Reads the experts' weights from the checkpoint onto this shard's device, quantised to int8 (a scale
        per output row, as local mode's `Int8RoutedExperts`) under any quantisation; on a GPU the registry runs
        them with the Triton fused-MoE kernel."""
        out = {}
        for layer, held in load_experts(self.model_dir, experts, self.weight_dtype).items():
            if self.quantization is not None:
                (w13, s13), (w2, s2) = kernels.quantize_int8(held.w13), kernels.quantize_int8(held.w2)
                held = LayerExperts(held.expert_ids, w13, w2, s13, s2)
            out[layer] = LayerExperts(held.expert_ids, *(t.to(self.device) for t in held.tensors))
        return out

    def _install(self, layers: dict[int, LayerExperts]) -> None:
        # logical expert id -> row of the stacked weights, or -1 where this shard does not hold it
        local: dict[int, torch.Tensor] = {}
        for layer, held in layers.items():
            index = torch.full((self.num_experts,), -1, dtype=torch.int64)
            index[list(held.expert_ids)] = torch.arange(len(held.expert_ids))
            local[layer] = index
        self.layers, self._local = layers, local

    @property
    def experts(self) -> list[Expert]:
        return [(layer, e) for layer, held in sorted(self.layers.items()) for e in held.expert_ids]

    # -- placement changes -------------------------------------------------------------------------
    def stage(self, experts: Iterable[Expert], holding: Iterable[Expert] | None = None) -> list[Expert]:
        """Loads the replicas among `experts` that this shard does not hold yet, without using them; returns
        those it loaded. With `holding` (everything the shard is to hold after the swap), also stacks the new
        holding's weights, so that `commit` of that holding only swaps them in. Serving goes on meanwhile."""
        with self._lock:
            new = sorted({(int(layer), int(e)) for layer, e in experts} - set(self.experts) - set(self._staged))
        loaded = self._load(new)  # the slow part, outside the lock: requests go on being served
        with self._lock:
            for layer, held in loaded.items():
                for row, e in enumerate(held.expert_ids):
                    self._staged[layer, e] = tuple(t[row] for t in held.tensors)
            if holding is None:
                return new
            wanted = _sorted(holding)
            missing = self._missing(wanted)
            layers, local, staged = dict(self.layers), dict(self._local), dict(self._staged)
        if missing:
            raise ValueError(f"expert shard {self.shard_index} cannot hold {missing[:8]}: neither held nor staged")
        prepared = _stack(wanted, layers, lambda layer, e: _weights(layers, local, staged, layer, e))
        with self._lock:
            generation = self._lora_generation
        lora = None if self.lora is None else self.lora.prepare(wanted)  # new replicas' adapters, read by name
        with self._lock:
            self._prepared = (tuple(wanted), prepared, lora, generation)
        return new

    def commit(self, version: int, experts: Iterable[Expert]) -> None:
        """Holds exactly `experts` from now on, on placement `version`: replicas it held or staged are
        kept; the rest are dropped. Refused, changing nothing, if an expert was neither held nor staged."""
        wanted = _sorted(experts)
        with self._lock:
            missing = self._missing(wanted)
            if missing:
                raise ValueError(f"expert shard {self.shard_index} cannot hold {missing[:8]}: neither held nor "
                                 f"staged (stage them first)")
            prepared = self._prepared if self._prepared is not None and self._prepared[0] == tuple(wanted) else None
            layers = prepared[1] if prepared else _stack(wanted, self.layers, self._weights)  # stacked while steps ran
            if self.lora is not None:  # prepared with the adapters loaded then, else read now
                fresh = prepared is not None and prepared[3] == self._lora_generation
                self.lora.install(prepared[2] if fresh else self.lora.prepare(wanted))
            self._install(layers)
            self.placement_version = version
            self._staged.clear()
            self._prepared = None

    def _missing(self, wanted: list[Expert]) -> list[Expert]:
        return [x for x in wanted if x not in self._staged and self._row(*x) is None]

    def local_rows(self, layer: int, expert_ids: torch.Tensor) -> torch.Tensor:
        """Logical expert ids of `layer` (-1 for slots of other shards) as rows of the stacked weights held."""
        return torch.where(expert_ids >= 0, self._local[layer][expert_ids.clamp(min=0)], -1)

    def _row(self, layer: int, expert: int) -> int | None:
        index = self._local.get(layer)
        row = -1 if index is None else int(index[expert])
        return None if row < 0 else row

    def _weights(self, layer: int, expert: int) -> Replica:
        return _weights(self.layers, self._local, self._staged, layer, expert)

    # -- LoRA adapters -------------------------------------------------------------------------------
    def load_adapter(self, slot: int, path: str) -> int:
        """Puts the peft adapter at `path` into `slot` for the replicas held here (the adapter checked against
        the model first: ValueError naming what does not fit, the slot unchanged); returns how many held
        replicas it adapts."""
        lora = self._lora()
        with self._lock:
            lora.load(slot, path, self.experts)
            self._lora_generation += 1
            return len(lora.updates[slot])

    def clear_adapter(self, slot: int) -> None:
        lora = self._lora()
        with self._lock:
            lora.clear(slot)
            self._lora_generation += 1

    def _lora(self) -> HeldExpertLora:
        if self.lora is None:
            raise ValueError(f"expert shard {self.shard_index} serves no LoRA adapters: the graph was started "
                             "without enable_lora")
        return self.lora

    # -- serving -----------------------------------------------------------------------------------
    def check(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, version: int,
        slots: torch.Tensor | None = None,
    ) -> None:
        """Raises ShardRequestError naming the first thing about a request that does not match this shard."""
        where = f"expert shard {self.shard_index}"
        if version != self.placement_version:
            raise ShardRequestError(
                f"{where} is on placement version {self.placement_version} but the request was routed with "
                f"version {version}"
            )
        if layer not in self.layers:
            raise ShardRequestError(f"{where} holds no experts of layer {layer}; it holds layers {sorted(self.layers)}")
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ShardRequestError(
                f"hidden_states must be [T, {self.hidden_size}] for {where}, got {list(hidden.shape)}"
            )
        if hidden.dtype != self.dtype:
            raise ShardRequestError(f"hidden_states must be {self.dtype} for {where}, got {hidden.dtype}")
        num_tokens = hidden.shape[0]
        if expert_ids.dtype != torch.int64 or expert_ids.dim() != 2 or expert_ids.shape[0] != num_tokens:
            raise ShardRequestError(
                f"expert_ids must be int64 [{num_tokens}, K], got {expert_ids.dtype} {list(expert_ids.shape)}"
            )
        if weights.dtype != torch.float32 or weights.shape != expert_ids.shape:
            raise ShardRequestError(
                f"weights must be float32 {list(expert_ids.shape)}, got {weights.dtype} {list(weights.shape)}"
            )
        ids = expert_ids[expert_ids >= 0]
        out_of_range = ids[ids >= self.num_experts].tolist() + expert_ids[expert_ids < -1].tolist()
        if out_of_range:
            raise ShardRequestError(f"expert_ids {sorted(set(out_of_range))[:5]} are not experts of this model "
                                    f"(0..{self.num_experts - 1}, or -1 for a slot of another shard)")
        missing = ids[self._local[layer][ids] < 0].unique().tolist()
        if missing:
            raise ShardRequestError(f"{where} does not hold experts {missing[:8]} of layer {layer}")
        if slots is not None:
            self._check_slots(where, slots, num_tokens)

    def _check_slots(self, where: str, slots: torch.Tensor, num_tokens: int) -> None:
        if slots.dtype != torch.int64 or tuple(slots.shape) != (num_tokens,):
            raise ShardRequestError(f"adapter_slots must be int64 [{num_tokens}], got {slots.dtype} {list(slots.shape)}")
        used = set(slots.unique().tolist()) - {-1}
        if not used:
            return
        if self.lora is None:
            raise ShardRequestError(f"{where} serves no LoRA adapters, but the request names adapter slots "
                                    f"{sorted(used)[:8]}")
        empty = sorted(s for s in used if s not in self.lora.paths)
        if empty:
            raise ShardRequestError(f"{where} has no adapter in slots {empty[:8]} (adapter_slots are -1 or a loaded "
                                    f"slot in [0, {self.lora.num_slots}))")

    @torch.inference_mode()
    def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        """sum_k weights[t, k] * expert_k(hidden[t]) over the slots this shard holds (ids >= 0), each (token,
        expert) pair adapted by the adapter in the token's slot `slots[t]` (-1 or None: none) where that
        adapter adapts the expert: [T, H], on the CPU."""
        held = self.layers[layer]
        tokens, cols = (expert_ids >= 0).nonzero(as_tuple=True)  # one row per routed (token, expert) pair
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        if tokens.numel() == 0:
            return out.to(hidden.dtype)
        self.pairs_served += tokens.numel()
        logical = expert_ids[tokens, cols].unsqueeze(1)  # [P, 1]
        local = self._local[layer][logical]  # [P, 1]
        dev = self.device
        x, w = hidden[tokens].to(dev), weights[tokens, cols].unsqueeze(1).to(dev)
        lora = self._adapters_in(layer, slots)
        if held.w13_scale is not None:  # int8 experts (no adapters: refused at construction)
            pair_out = kernels.fused_moe_int8(x, held.w13, held.w13_scale, held.w2, held.w2_scale, w, local.to(dev),
                                              self.quantize_activations)
        elif lora is None:
            moe = kernels.fused_moe if x.dtype == held.w13.dtype else kernels.fused_moe_mixed
            pair_out = moe(x, held.w13, held.w2, w, local.to(dev))
        else:
            rows = kernels.expert_lora_rows(lora.index, slots[tokens].to(dev), logical.to(dev))  # [P, 1]
            pair_out = kernels.fused_moe_lora(x, held.w13, held.w2, w, local.to(dev), rows, lora.a13, lora.b13,
                                              lora.a2, lora.b2)
        return out.index_add_(0, tokens, pair_out.float().cpu()).to(hidden.dtype)

    def _adapters_in(self, layer: int, slots: torch.Tensor | None):
        """The layer's adapter stacks when a token's slot adapts one of its experts held here, else None."""
        if slots is None or self.lora is None:
            return None
        lora = self.lora.layers.get(layer)
        if lora is None or lora.slots.isdisjoint(slots.unique().tolist()):
            return None
        return lora

    def serve(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              version: int, slots: torch.Tensor | None = None) -> torch.Tensor:
        """A data-plane request: checked, then computed (one at a time: the kernels already use every thread
        this shard has). `slots` [T]: each token's adapter slot, -1 for the base model."""
        with self._lock:
            self.check(layer, hidden, expert_ids, weights, version, slots)
            start = time.perf_counter()
            out = self.forward(layer, hidden, expert_ids, weights, slots)
            self.last_compute_s = time.perf_counter() - start
            return out


def _sorted(experts: Iterable[Expert]) -> list[Expert]:
    return sorted({(int(layer), int(e)) for layer, e in experts})


def _weights(layers: dict[int, LayerExperts], local: dict[int, torch.Tensor], staged: dict[Expert, Replica],
             layer: int, expert: int) -> Replica:
    """One replica's tensors: a row of a held layer, or a staged one."""
    index = local.get(layer)
    row = -1 if index is None else int(index[expert])
    if row < 0:
        return staged[layer, expert]
    return tuple(t[row] for t in layers[layer].tensors)


def _stack(wanted: list[Expert], current: dict[int, LayerExperts], weights) -> dict[int, LayerExperts]:
    """Each layer of the holding `wanted` stacked; a layer whose experts do not change keeps its tensors."""
    by_layer: dict[int, list[int]] = {}
    for layer, e in wanted:
        by_layer.setdefault(layer, []).append(e)
    out = {}
    for layer, ids in by_layer.items():
        if layer in current and current[layer].expert_ids == tuple(ids):
            out[layer] = current[layer]
            continue
        rows = [weights(layer, e) for e in ids]
        out[layer] = LayerExperts(tuple(ids), *(torch.stack(column) for column in zip(*rows)))
    return out
