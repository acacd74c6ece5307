"""Expert state, pure (no torch, no Ray): which shards hold which experts, how much load each expert and
shard takes, and the health figures read from that load.

- `placement.py`: `PlacementTable`, versioned, with slots per shard; diffs and drains between versions
- `load.py`: `ExpertLoad`, per-expert token counts since the start and over a sliding window
- `health.py`: per-layer busiest share, max/mean, routing entropy, idle experts
- `balance.py`: the load each shard takes under a placement, and per-layer balancedness
- `rebalance.py`: `rebalance`, a new placement from recent load that evens out the shards (EPLB's idea)
- `selection.py`: expert-aware selection (ESFT): the experts of each layer a task's data uses
"""

from expertmesh.experts.balance import ShardLoad, layer_balancedness, shard_loads
from expertmesh.experts.health import LayerHealth, expert_health, expert_shares, layer_health
from expertmesh.experts.load import ExpertLoad
from expertmesh.experts.placement import Expert, PlacementTable
from expertmesh.experts.rebalance import rebalance
from expertmesh.experts.selection import relevance_shares, select_experts

__all__ = [
    "Expert", "ExpertLoad", "LayerHealth", "PlacementTable", "ShardLoad", "expert_health", "expert_shares",
    "layer_balancedness", "layer_health", "rebalance", "relevance_shares", "select_experts",
    "shard_loads",
]
