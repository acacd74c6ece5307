"""The router: gate weights, the expert placement table, live load counts, and the conduct of each step.

`RouterCore` is the math, usable in any process: per MoE layer it routes the hidden states with the same
`route` function local mode calls, groups the routed (token, expert) pairs by the shard holding a replica,
has a `Dispatch` run them, and sums the shards' weighted outputs per token. `run_step` walks one step's
(layer, micro-batch) slots in order, taking each micro-batch's hidden states from the attention actors and
handing back the routed output, so attention of one micro-batch overlaps the experts of the other.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

from expertmesh.actors.step import StepPlan, StepSlots
from expertmesh.engine.executor import count_routed
from expertmesh.experts import ExpertLoad, PlacementTable
from expertmesh.model import load_gates, resolve_dtype
from expertmesh.model.loader import check_activation_dtype
from expertmesh.model.moe import route
from expertmesh.transport import Dispatch, ShardWork


class RouterCore:
    def __init__(self, model_dir: str | Path, placement: PlacementTable, *, dtype: str | torch.dtype = "float32",
                 window_steps: int = 256, activation_dtype: str | torch.dtype | None = None):
        self.config, self.gates = load_gates(model_dir, dtype)
        self.dtype = check_activation_dtype(resolve_dtype(dtype), activation_dtype)  # the hidden states' dtype
        self.hidden_size = self.config.hidden_size
        self.num_experts = self.config.routing.num_experts
        self.moe_layers = sorted(self.gates)
        # tokens per expert per layer, since the start and over the last `window_steps` steps
        self.load = ExpertLoad(self.moe_layers, self.num_experts, window_steps=window_steps)
        # (tokens, seconds, shard compute seconds) of recent dispatch round trips: from sending a layer's work
        # to the shards until the last output is back; the slowest shard's time on its experts is inside it
        self.round_trips: deque[tuple[int, float, float]] = deque(maxlen=4096)
        # (step seconds, of which waiting for the attention actors' hidden states, of which dispatching)
        self.step_timings: deque[tuple[float, float, float]] = deque(maxlen=1024)
        self.set_placement(placement)

    def set_placement(self, table: PlacementTable) -> None:
        """Swaps in a placement table (between steps); it must cover this model's MoE layers and experts.
        Every transport reads `layer_shards` and the version at each call, so the next step uses it."""
        table.check_fits(self.moe_layers, self.num_experts)
        primary, replicated = {}, {}
        for layer in self.moe_layers:
            replicas = [table.shards_for(layer, e) for e in range(self.num_experts)]
            primary[layer] = torch.tensor([r[0] for r in replicas], dtype=torch.int64)  # [E] first replica
            replicated[layer] = any(len(r) > 1 for r in replicas)
        # built whole, then swapped in together
        self._primary, self._replicated = primary, replicated
        self.layer_shards = {layer: table.layer_shards(layer) for layer in self.moe_layers}
        self.placement = table

    def route(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.gates[layer]
        return route(hidden, gate.weight, gate.correction_bias, self.config.routing)

    def split(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              slots: torch.Tensor | None = None) -> list[ShardWork]:
        """The work of each shard that received any pair, in shard order, with its tokens' adapter slots."""
        if self._replicated[layer]:  # a hot expert's pairs are dealt over its replicas in turn
            shard_of = torch.tensor(self.placement.assign(layer, ids.reshape(-1).tolist())).view_as(ids)
        else:
            shard_of = self._primary[layer][ids]
        works = []
        for shard in self.layer_shards[layer]:
            mine = shard_of == shard  # [T, K]
            tokens = mine.any(dim=1).nonzero().squeeze(1)
            if tokens.numel() == 0:
                continue
            works.append(ShardWork(
                shard=shard, tokens=tokens, hidden_states=hidden[tokens],
                expert_ids=torch.where(mine, ids, -1)[tokens], weights=torch.where(mine, weights, 0.0)[tokens],
                slots=None if slots is None else slots[tokens],
            ))
        return works

    def combine(self, hidden: torch.Tensor, works: Sequence[ShardWork], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for work, y in zip(works, outputs):
            out.index_add_(0, work.tokens, y.float())
        return out.to(hidden.dtype)

    @torch.inference_mode()
    def moe(self, step: int, layer: int, hidden: torch.Tensor, dispatch: Dispatch,
            slots: torch.Tensor | None = None) -> torch.Tensor:
        """The routed-expert output of one layer for [T, H] hidden states, computed on the shards; `slots` [T]
        names each token's LoRA adapter slot (-1: none), which the shards apply to the experts it adapts."""
        weights, ids = self.route(layer, hidden)
        self.load.add(layer, count_routed(ids, self.num_experts))
        works = self.split(layer, hidden, weights, ids, slots)
        start = time.perf_counter()
        outputs = dispatch.dispatch(step, layer, self.placement.version, works)
        self.round_trips.append((hidden.shape[0], time.perf_counter() - start, dispatch.last_compute_s))
        return self.combine(hidden, works, outputs)

    def run_step(self, step: int, plan: StepPlan, attention, dispatch: Dispatch, on_micro_batch=None,
                 slots: StepSlots | None = None) -> None:
        """Serves every MoE layer of every micro-batch of one step. `attention` is the router side of the
        attention link (`receive`/`reply`); `on_micro_batch(mb)` lets a transport tag its messages; `slots`
        gives each token's adapter slot (None: no adapter in the step)."""
        mb_slots = [None if slots is None else
                    torch.tensor([s for r in sorted(counts) if counts[r] > 0 for s in slots[mb][r]], dtype=torch.int64)
                    for mb, counts in enumerate(plan)]
        attention.start_step(step)
        started, waited = time.perf_counter(), 0.0
        dispatched = len(self.round_trips)
        for layer in self.moe_layers:
            for mb, counts in enumerate(plan):
                ranks = [r for r, n in sorted(counts.items()) if n > 0]
                if not ranks:
                    continue
                t = time.perf_counter()
                parts = [attention.receive(step, mb, layer, r, counts[r], self.hidden_size) for r in ranks]
                waited += time.perf_counter() - t
                hidden = parts[0] if len(parts) == 1 else torch.cat(parts)
                if on_micro_batch is not None:
                    on_micro_batch(mb)
                out = self.moe(step, layer, hidden, dispatch, mb_slots[mb])
                for r, piece in zip(ranks, out.split([counts[r] for r in ranks])):
                    attention.reply(step, mb, layer, r, piece)
        attention.finish_step()
        self.finish_step()
        dispatch_s = sum(rt for _, rt, _ in list(self.round_trips)[dispatched:])
        self.step_timings.append((time.perf_counter() - started, waited, dispatch_s))

    def finish_step(self) -> None:
        """Closes a step's counts into the sliding window."""
        self.load.finish_step()

    def load_counts(self, window: bool = False) -> dict[int, list[int]]:
        """(token, expert) pairs routed to each expert of each MoE layer since the router started, or with
        `window` over the last `window_steps` finished steps."""
        return self.load.counts(window)
