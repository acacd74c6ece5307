"""The "inprocess" transport: the shards' runtimes live in the router's process; a dispatch is a call."""

from __future__ import annotations

from collections.abc import Mapping

from expertmesh.transport.work import ShardRuntime


class InProcessDispatch:
    def __init__(self, shards: Mapping[int, ShardRuntime]):
        self.shards = shards  # by shard index; the router may swap entries between steps
        self.last_compute_s = 0.0

    def dispatch(self, step, layer, version, works):
        outs, self.last_compute_s = [], 0.0
        for w in works:
            shard = self.shards[w.shard]
            outs.append(shard.serve(layer, w.hidden_states, w.expert_ids, w.weights, version, w.slots))
            self.last_compute_s += shard.last_compute_s  # one after the other: the sum is the compute
        return outs

    def close(self) -> None:
        pass
