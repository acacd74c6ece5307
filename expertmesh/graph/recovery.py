"""Recovery: replaces the graph's dead or stalled actors and wires the data plane again.

Dead: no answer to a ping within the control timeout (killed, its node lost). Stalled: named by a failed
step as the peer that missed its data-plane deadline or answered out of step, while still answering Ray.
Out of date: a shard or router on another placement version than the graph's (a swap that did not reach
it). Each is stopped and started afresh in a new placement group; an attention actor's sequences are then
re-prefilled from their token history. Recovery waits at most `recovery_timeout_s` for replacements to be
placed: past that it fails the step with an error naming what could not be placed, and the next step tries
again.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING

from ray.exceptions import GetTimeoutError, RayActorError

from expertmesh.graph.builder import Member
from expertmesh.graph.runtime import ray

if TYPE_CHECKING:
    from expertmesh.graph.executor import ActorGraphExecutor

log = logging.getLogger(__name__)


class RecoveryFailed(RuntimeError):
    """Replacements could not be placed and started in time; the message says which and what they need."""


def ping_all(members: list[Member], timeout_s: float) -> dict[int, dict | None]:
    """Each member's ping answer, by position, or None where it did not answer within `timeout_s`."""
    refs = [m.handle.ping.remote() for m in members]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out: dict[int, dict | None] = {}
    for i, ref in enumerate(refs):
        out[i] = None
        if ref in ready:
            try:
                out[i] = ray.get(ref)
            except Exception:  # noqa: BLE001 - dead is the answer
                pass
    return out


class Recovery:
    def __init__(self, executor: ActorGraphExecutor):
        self.ex = executor
        self.restart_all = False  # a failed collective step: every actor is restarted
        self.pending: str | None = None  # why the last recovery gave up, until one succeeds

    def run(self, suspects: set[tuple[str, int]]) -> None:
        ex, d = self.ex, self.ex.deployment
        deadline = time.monotonic() + d.recovery_timeout_s
        everything, self.restart_all = self.restart_all, False
        rewire, replaced = self.pending is not None, []
        for attempt in itertools.count():
            fresh = self._replace_broken(everything, suspects)
            suspects, everything = set(), False
            replaced += [m.label for m in fresh]
            try:
                ex.builder.wait_ready(fresh, max(0.0, deadline - time.monotonic()), "recovery gave up")
                ex.settle_micro_batches()
                if fresh or rewire:
                    ex.wire()  # new actors: new addresses (or a new process group)
                break
            except TimeoutError as e:
                for m in fresh:  # not placed in time: stopped, so that the next recovery starts them afresh
                    if not m.placed:
                        ex.builder.stop(m)
                self.pending = str(e)
                raise RecoveryFailed(str(e)) from None
            except (RayActorError, GetTimeoutError) as e:
                # a replacement died while starting (its node lost too), or wiring found a dead peer: again
                log.warning("recovery round %d failed (%s); trying again", attempt + 1, e)
                rewire = True
                if time.monotonic() > deadline:
                    self.pending = f"recovery did not finish within {d.recovery_timeout_s:g} s: {e}"
                    raise RecoveryFailed(self.pending) from None
                time.sleep(min(1.0 * (attempt + 1), 5.0))
                everything = d.transport == "collective"  # survivors may be stuck joining a dead group
        self.pending = None
        ex.recoveries.append(", ".join(dict.fromkeys(replaced)) or "retried the step with every actor alive")
        log.warning("actor graph recovered: %s", ex.recoveries[-1])

    def _replace_broken(self, everything: bool, suspects: set[tuple[str, int]]) -> list[Member]:
        """Stops and restarts every member that is dead, suspected or on another placement version; returns
        the new members (not yet known to be up)."""
        ex = self.ex
        members = ex.members()
        answers = ping_all(members, ex.deployment.control_timeout_s) if not everything else {}
        version = ex.placement.version
        fresh = []
        for i, m in enumerate(members):
            info = answers.get(i)
            stale = info is not None and info.get("placement_version", version) != version
            if not (everything or info is None or stale or (m.role, m.index) in suspects):
                continue
            ex.builder.stop(m)
            others = [x for x in ex.members() if x is not m]
            if m.role == "attention":
                new = ex.builder.start_attention(m.index, others)
                ex.attention_members[ex.attention_members.index(m)] = new
                ex.homes.lose(m.index)
            elif m.role == "router":
                new = ex.builder.start_router(ex.placement, others)
                ex.router_member = new
            else:
                new = ex.builder.start_shard(m.index, ex.placement, others)
                ex.shard_members[ex.shard_members.index(m)] = new
            fresh.append(new)
        return fresh
