"""The "inprocess" transport: the shards' runtimes live in the router's process; a dispatch is a call."""

from __future__ import annotations

import time
from collections.abc import Mapping

from expertmesh.transport.work import ShardRuntime


class InProcessDispatch:
    def __init__(self, shards: Mapping[int, ShardRuntime]):
        self.shards = shards  # by shard index; the router may swap entries between steps
        self.last_compute_s = 0.0

    def dispatch(self, step, layer, version, works):
        outs = []
        start = time.perf_counter()
        for w in works:
            outs.append(self.shards[w.shard].serve(layer, w.hidden_states, w.expert_ids, w.weights, version))
        self.last_compute_s = time.perf_counter() - start  # one after the other: all of it is compute
        return outs

    def close(self) -> None:
        pass
