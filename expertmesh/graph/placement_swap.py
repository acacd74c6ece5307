"""Changing the expert placement while the graph serves.

Two moves. `start` asks every shard that gains replicas to load them by name beside the ones in use
(`stage`): the steps go on meanwhile. `commit_if_ready`, called by the executor between two steps, swaps
everything at once once the loads are in: the router takes the new table (and version), every shard its
new holding and version, dropping what it no longer holds. A step therefore runs wholly on one version.
A swap that cannot complete (a shard died while loading) is dropped and logged; one that reached only some
actors leaves them on different versions, which recovery mends by restarting those behind.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from expertmesh.experts import PlacementTable
from expertmesh.graph.runtime import ray

if TYPE_CHECKING:
    from expertmesh.graph.executor import ActorGraphExecutor

log = logging.getLogger(__name__)


@dataclass
class _Swap:
    table: PlacementTable
    loads: list  # ObjectRefs of the shards' `stage` calls
    loaded: int  # replicas the shards load
    dropped: int  # replicas they drop at the swap
    started: float = field(default_factory=time.monotonic)
    joined: bool = True  # False while the shards the table adds are still starting


class PlacementSwap:
    def __init__(self, executor: ActorGraphExecutor):
        self.ex = executor
        self._lock = threading.Lock()
        self._pending: _Swap | None = None
        self.history: list[dict] = []  # one entry per swap tried: version, outcome, replicas loaded and dropped

    def start(self, table: PlacementTable, *, wait: bool = True, timeout_s: float | None = None,
              joining: Callable[[PlacementTable], None] | None = None) -> PlacementTable:
        """Starts loading `table`'s new replicas; with `wait`, returns once they are loaded (the swap itself
        happens at the next step boundary). The table gets the version after the current one. Returns it.

        A table with more shards than run needs `joining(table)`: it starts the shards the table adds, each
        loading its part of the table as it starts, and returns once they are connected. It runs after the
        running shards were asked to stage, so the two overlap; the swap cannot commit before it returns, and
        if it raises, the swap is dropped (nothing was swapped) and the error goes to the caller."""
        ex = self.ex
        current = ex.placement
        table.check_fits(current.moe_layers, current.num_experts)
        running = ex.running_shards()
        if table.num_shards != current.num_shards and ex.deployment.transport == "collective":
            raise ValueError(f"the placement has {table.num_shards} shards; this graph runs {current.num_shards}, and "
                             "over the collective transport their number is fixed (its process group is)")
        if running is not None and table.num_shards > running and joining is None:
            raise ValueError(f"the placement has {table.num_shards} shards; this graph runs {running} (start more "
                             "first: add_expert_shards)")
        with self._lock:
            if self._pending is not None:
                raise ValueError(f"a swap to placement version {self._pending.table.version} is pending (it loads, "
                                 f"then takes effect at a step boundary): wait for it first")
            table = dataclasses.replace(table, version=current.version + 1)
            diff = current.diff(table)
            # every shard whose holding changes stages: new replicas load, and the new stacks are built there
            # while steps go on, so that the commit between two steps only swaps references
            staging = table.num_shards if running is None else min(table.num_shards, running)
            loads = [self._stage(s, added, table.shard_experts(s)) for s, (added, _) in diff.items() if s < staging]
            swap = self._pending = _Swap(table, loads, loaded=sum(len(a) for a, _ in diff.values()),
                                         dropped=sum(len(d) for _, d in diff.values()), joined=joining is None)
        if joining is not None:
            try:
                joining(table)
            except BaseException as e:
                with self._lock:
                    self._pending = None
                self.history.append({"version": table.version, "at": time.time(), "loaded": swap.loaded,
                                     "dropped": swap.dropped, "outcome": f"not swapped: {type(e).__name__} while "
                                     "the new shards started"})
                raise
            swap.joined = True
        if wait:
            ray.wait(loads, num_returns=len(loads), timeout=timeout_s or ex.deployment.recovery_timeout_s)
        return table

    def _stage(self, shard: int, experts: list, holding: list):
        ex = self.ex
        if ex.deployment.transport == "inprocess":
            return ex.router.stage_hosted.remote(shard, experts, holding)
        return next(m for m in ex.shard_members if m.index == shard).handle.stage.remote(experts, holding)

    @property
    def pending_version(self) -> int | None:
        with self._lock:
            return None if self._pending is None else self._pending.table.version

    def commit_if_ready(self) -> None:
        """Between steps: swaps the pending placement in if its replicas are loaded (else leaves it be)."""
        with self._lock:
            swap = self._pending
            if swap is None or not swap.joined:
                return
            ready, _ = ray.wait(swap.loads, num_returns=len(swap.loads), timeout=0)
            if len(ready) < len(swap.loads):
                return
            self._pending = None
        ex, table = self.ex, swap.table
        # from the start of the swap to this step boundary: the loads and stacking, then the wait for a step to end
        record = {"version": table.version, "at": time.time(), "seconds_to_swap": time.monotonic() - swap.started,
                  "loaded": swap.loaded, "dropped": swap.dropped}
        try:
            ray.get(swap.loads)
        except Exception as e:  # noqa: BLE001 - a shard died or refused while loading: nothing was swapped
            log.warning("placement version %d was not swapped in: %s", table.version, e)
            self.history.append({**record, "outcome": f"not swapped: {type(e).__name__}"})
            return
        calls = [ex.router.set_placement.remote(table.to_dict())]
        for s in range(table.num_shards):  # shards past a smaller table's count keep their weights until retired
            experts = table.shard_experts(s)
            if ex.deployment.transport == "inprocess":
                calls.append(ex.router.commit_hosted.remote(s, table.version, experts))
            else:
                member = next(m for m in ex.shard_members if m.index == s)
                calls.append(member.handle.commit.remote(table.version, experts))
        before = ex.placement
        ex.placement = table  # the graph's truth from here on: an actor left behind is restarted on it
        try:
            ray.get(calls, timeout=ex.deployment.control_timeout_s)
        except Exception as e:  # noqa: BLE001 - some actors are on the old version: recovery restarts them
            log.warning("placement version %d reached only some actors (%s); recovering", table.version, e)
            ex.recovery.pending = f"placement version {table.version} did not reach every actor"
            self.history.append({**record, "outcome": "partly swapped; recovery restarts the actors behind"})
            return
        if table.num_shards < before.num_shards:  # the shards past the new count got no work in any step since
            ex.retire_shards(list(range(table.num_shards, before.num_shards)))
            record["retired"] = before.num_shards - table.num_shards
        self.history.append({**record, "outcome": "swapped", "num_shards": table.num_shards})
