"""Pure step planning: which attention actor computes which tokens of a step, in how many micro-batches,
what the router expects, and how the logits rows come back in the batch's order. No Ray, no actors: the
executor calls these and ships the result.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from expertmesh.actors.step import MicroBatch
from expertmesh.engine.scheduler import ScheduledBatch
from expertmesh.experts import PlacementTable


class Homes:
    """Which attention actor holds each sequence's cache, and whose caches were lost (they are recomputed
    from their token history, from token 0, the next time they are scheduled)."""

    def __init__(self, num_ranks: int):
        self.num_ranks = num_ranks
        self._rank: dict[int, int] = {}  # seq_id -> rank
        self._seqs: dict[int, object] = {}  # seq_id -> Sequence, to notice when it finishes
        self.lost: set[int] = set()

    def rank_of(self, seq) -> int:
        """The sequence's attention actor; a new sequence goes to the one holding the fewest."""
        rank = self._rank.get(seq.seq_id)
        if rank is None:
            load = [0] * self.num_ranks
            for r in self._rank.values():
                load[r] += 1
            rank = self._rank[seq.seq_id] = min(range(self.num_ranks), key=load.__getitem__)
            self._seqs[seq.seq_id] = seq
        return rank

    def ranks(self) -> dict[int, int]:
        return dict(self._rank)

    def forget_finished(self) -> None:
        for seq_id in [i for i, s in self._seqs.items() if s.is_finished]:
            del self._rank[seq_id], self._seqs[seq_id]
            self.lost.discard(seq_id)

    def lose(self, rank: int) -> None:
        """The caches of `rank` are gone (its actor was replaced)."""
        self.lost.update(i for i, r in self._rank.items() if r == rank)

    def recomputed(self, seq_ids: Iterable[int]) -> None:
        self.lost.difference_update(seq_ids)


@dataclass(frozen=True, slots=True)
class PlannedStep:
    inputs: dict[int, list[MicroBatch | None]]  # per attention rank: micro-batch 0 and 1 (None: none)
    router_plan: list[dict[int, int]]  # per micro-batch with work: {attention rank: tokens}
    rows: list[tuple[int, int, int]]  # (rank, micro-batch, row) of each logits row, in plan order
    order: list[tuple[int, int]]  # (batch index, logits rows) in plan order, to restore the batch's order
    router_slots: list[dict[int, list[int]]] | None = None  # beside router_plan: each token's adapter slot

    @property
    def active_micro_batches(self) -> list[int]:
        return [mb for mb, counts in enumerate(self.router_plan) if any(counts.values())]


def plan_step(batch: ScheduledBatch, homes: Homes, *, micro_batches: int, all_logits: bool) -> PlannedStep:
    """Per attention actor, up to two micro-batches of about equal tokens; the router's plan; where each
    logits row comes from (one per sampled sequence, or with `all_logits` one per scheduled token)."""
    per_rank: dict[int, list[tuple[int, object, int, bool]]] = {}
    for i, (seq, n, sample) in enumerate(zip(batch.seqs, batch.num_new_tokens, batch.sample_mask)):
        per_rank.setdefault(homes.rank_of(seq), []).append((i, seq, n, sample))
    inputs: dict[int, list[MicroBatch | None]] = {}
    rows: list[tuple[int, int, int]] = []
    order: list[tuple[int, int]] = []
    plan: list[dict[int, int]] = [{}, {}]
    adapters = any(seq.adapter_slot >= 0 for seq in batch.seqs)  # else no slot is sent at all
    plan_slots: list[dict[int, list[int]]] = [{}, {}]
    for rank, items in per_rank.items():
        halves = split_two(items) if len(items) > 1 and micro_batches == 2 else [items]
        inputs[rank] = [None, None]
        for mb, part in enumerate(halves):
            ids, qlens, clens, tables, logits_rows, slots = [], [], [], [], [], []
            for i, seq, n, sample in part:
                start = seq.num_computed_tokens
                first = 0 if seq.seq_id in homes.lost else start  # a lost cache: recompute from token 0
                ids.extend(seq.token_ids[first : start + n])
                offset = len(ids)
                qlens.append(start + n - first)
                slots.extend([seq.adapter_slot] * (start + n - first))
                clens.append(start + n)
                tables.append(seq.block_table)
                wanted = range(offset - n, offset) if all_logits else ([offset - 1] if sample else [])
                order.append((i, len(wanted)))
                for row in wanted:
                    rows.append((rank, mb, len(logits_rows)))
                    logits_rows.append(row)
            inputs[rank][mb] = MicroBatch(ids, qlens, clens, tables, logits_rows, slots if adapters else None)
            plan[mb][rank] = len(ids)
            plan_slots[mb][rank] = slots
    router_slots = [s for p, s in zip(plan, plan_slots) if p] if adapters else None
    return PlannedStep(inputs, [p for p in plan if p], rows, order, router_slots)


def assemble(results: Mapping[int, Sequence[np.ndarray | None]], step: PlannedStep) -> np.ndarray:
    """The logits rows of every attention actor's micro-batches, back in the batch's order: [N, V]."""
    if not step.rows:
        return np.empty((0, 0), dtype=np.float32)
    starts = list(itertools.accumulate((n for _, n in step.order), initial=0))
    index = [r for (_, n), start in sorted(zip(step.order, starts)) for r in range(start, start + n)]
    # a fresh, writable array: the sampler bans tokens in place
    return np.stack([results[rank][mb][row] for rank, mb, row in (step.rows[i] for i in index)])


def collective_slots(placement: PlacementTable, shard: int, micro_batches: Sequence[int]) -> list[tuple[int, int]]:
    """The (layer, micro-batch) messages a shard answers in one step of the collective transport, in the
    router's order: every micro-batch of every layer it holds experts of."""
    layers = [layer for layer in placement.moe_layers if placement.holds_layer(shard, layer)]
    return [(layer, mb) for layer in layers for mb in micro_batches]


def split_two(items: list) -> list[list]:
    """Two micro-batches of about equal token counts, keeping the batch's order within each."""
    total = sum(n for _, _, n, _ in items)
    first, acc = [], 0
    for item in items:
        if acc >= total / 2 and first:
            break
        first.append(item)
        acc += item[2]
    rest = items[len(first):]
    return [first, rest] if rest else [first]
