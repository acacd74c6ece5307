"""Elastic experts while serving: the live rebalancer and the expert shards' autoscaler.

Rebalancing reads the router's recent load, asks the rebalancer for a better placement and, when the policy
finds the gain worth it, starts the swap. The new replicas load on the shards in the background while steps
go on; the executor swaps the placement in between two steps, and the shards then drop what they no longer
hold. Nothing waits on the loads: a request never sees a half-swapped graph.

Scaling up starts the new shards (each in its own placement group; where no node has room, Ray's autoscaler
is asked for one and the shard waits), then swaps in a placement over all of them, rebalanced on the load.
Scaling down swaps in a placement over fewer shards; once it is in force, the executor ends the shards past
its count (no step after the swap gave them work).

Rebalancing runs every `rebalance_interval_s`, scaling every `shard_autoscaling.interval_s` (the
deployment's), and both on demand (`POST /v1/experts/rebalance`, `POST /v1/experts/scale`). One change at a
time: a request while one is being decided or a swap is under way is refused (`RebalanceBusy`, a 409), never
queued as a second swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from expertmesh.engine.executor import PlacementExecutor
from expertmesh.experts import rebalance

log = logging.getLogger(__name__)


class RebalanceBusy(RuntimeError):
    """A rebalance is being decided, or a swap is under way."""


class ElasticExperts:
    def __init__(self, executor: PlacementExecutor, *, alive: Callable[[], bool] = lambda: True):
        """`alive`: whether the engine still runs (the intervals' threads end when it no longer does)."""
        self.executor, self._alive = executor, alive
        self.policy = executor.rebalance_policy
        self.scaling = executor.autoscale_policy
        self.decisions: deque[dict] = deque(maxlen=256)  # every rebalance tried, oldest first
        self.scalings: deque[dict] = deque(maxlen=256)  # every change of the shard count, oldest first
        self._last_change = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Starts rebalancing every `rebalance_interval_s` and autoscaling every `shard_autoscaling.interval_s`
        (each only where the deployment asks for it)."""
        if self._threads:
            return
        if self.policy.interval_s is not None:
            self._threads.append(threading.Thread(target=self._every, args=(self.policy.interval_s, self.rebalance),
                                                  name="expert-rebalancer", daemon=True))
        if self.scaling.enabled:
            self._threads.append(threading.Thread(target=self._every, args=(self.scaling.interval_s, self.autoscale),
                                                  name="expert-autoscaler", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _every(self, interval_s: float, act: Callable[[], object]) -> None:
        while not self._stop.wait(interval_s) and self._alive():
            try:
                act()
            except RebalanceBusy:
                pass  # the last change is still under way: the next interval tries again
            except Exception:  # noqa: BLE001 - a failed try (the router did not answer) must not end the loop
                log.exception("%s failed; trying again in %g s", getattr(act, "__name__", "elastic experts"),
                              interval_s)

    @contextmanager
    def _one_change(self) -> Iterator[None]:
        """Holds the one-change-at-a-time lock; RebalanceBusy when another change is being decided or a swap
        is under way."""
        if not self._lock.acquire(blocking=False):
            raise RebalanceBusy("a rebalance or a change of the shard count is being decided; try again when it "
                                "is done")
        try:
            pending = self.executor.placement_pending()
            if pending is not None:
                raise RebalanceBusy(f"the swap to placement version {pending} is under way (its replicas load, "
                                    "then it takes effect between two steps); try again when it is done")
            yield
        finally:
            self._lock.release()

    def _rows(self, load: dict) -> list[list[int]]:
        current = self.executor.placement
        return [list(load.get(layer, [0] * current.num_experts)) for layer in current.moe_layers]

    def rebalance(self, *, force: bool = False) -> dict:
        """Decides on the current load window and, when worth it (or `force`d and not worse), starts the swap.
        Returns the decision: when, the figures before and after, the gain, the version it swaps to (None when
        it did not). RebalanceBusy while another is under way."""
        with self._one_change():
            ex = self.executor
            current = ex.placement
            load = ex.load_counts(window=True)
            rows = self._rows(load)
            started = time.perf_counter()
            proposed = rebalance(rows, moe_layers=current.moe_layers, num_shards=current.num_shards,
                                 slots_per_shard=self.policy.slots_per_shard, base=current)
            verdict = self.policy.judge(current, proposed, load, force=force)
            decision = {"at": time.time(), "from_version": current.version, "version": None,
                        "decide_seconds": time.perf_counter() - started, **verdict.to_dict()}
            if verdict.worth_it and dict(proposed.replicas) == dict(current.replicas):
                decision.update(worth_it=False, reason="the placement in use is already the one proposed")
            elif verdict.worth_it:
                table = ex.set_placement(proposed, wait=False)
                moves = current.diff(table)
                decision.update(version=table.version, replicas_loaded=sum(len(a) for a, _ in moves.values()),
                                replicas_dropped=sum(len(d) for _, d in moves.values()))
                log.info("rebalancing the experts: placement version %d, busiest shard over mean %.3f -> %.3f",
                         table.version, verdict.before, verdict.after)
            self.decisions.append(decision)
            return decision

    def scale(self, shards: int, *, why: str = "asked for") -> dict:
        """Runs `shards` expert shards from the next swap on: swaps in a placement over them rebalanced on the
        recent load, starting the new ones when growing (this waits for them to be placed, started and
        connected). Returns the change: when, from, to, the version, seconds until the new shards were
        connected (`start_seconds`).
        ValueError outside the deployment's bounds; RebalanceBusy while another change is under way."""
        self.scaling.check_target(shards)
        with self._one_change():
            ex = self.executor
            current = ex.placement
            change = {"at": time.time(), "from": current.num_shards, "to": shards, "why": why, "version": None}
            if shards == current.num_shards:
                change["reason"] = f"the graph already runs {shards} expert shards"
                return change
            started = time.perf_counter()
            table = rebalance(self._rows(ex.load_counts(window=True)), moe_layers=current.moe_layers,
                              num_shards=shards, slots_per_shard=self.policy.slots_per_shard, base=current)
            # growing, this starts the new shards, each loading its replicas as it starts, while the running
            # shards load theirs; it returns once the new shards are connected
            table = ex.set_placement(table, wait=False)
            change["start_seconds"] = time.perf_counter() - started
            moves = current.diff(table)
            change.update(version=table.version, replicas_loaded=sum(len(a) for a, _ in moves.values()))
            self._last_change = time.monotonic()
            self.scalings.append(change)
            log.info("expert shards %d -> %d (%s): placement version %d", current.num_shards, shards, why,
                     table.version)
            return change

    def autoscale(self) -> dict | None:
        """One look at the step timings: scales by one shard when the policy says so (then the timings start
        afresh, so the next look judges the new count)."""
        current = self.executor.placement.num_shards
        target, why = self.scaling.target(current, self.executor.expert_step_timings(),
                                          time.monotonic() - self._last_change)
        if target == current:
            return None
        change = self.scale(target, why=why)
        self.executor.expert_step_timings(clear=True)
        return change

    def status(self) -> dict:
        """What /v1/experts shows: the policies, the swap under way, every decision, scaling and swap."""
        p, a = self.policy, self.scaling
        return {"slots_per_shard": p.slots_per_shard, "interval_s": p.interval_s, "min_gain": p.min_gain,
                "expert_shards": {"min": a.min_shards, "max": a.max_shards, "now": self.executor.placement.num_shards,
                                  "autoscaling": a.enabled},
                "pending_version": self.executor.placement_pending(), "decisions": list(self.decisions),
                "scalings": list(self.scalings), "swaps": self.executor.placement_swaps()}
