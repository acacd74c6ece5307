"""The actors of one model replica. The math lives in plain classes usable in any process; the `*_actor.py`
modules wrap them as the Ray actors that `expertmesh.graph` starts (and is the only one to start).

- `attention.py`: `AttentionWorker` (the model without its routed experts, the paged cache, two micro-batches)
- `router.py`: `RouterCore` (gates, placement, load counts; conducts a step's layers)
- `expert_shard.py`: `ExpertShard` (some (layer, expert) pairs and their math; staged placement changes)
- `step.py`: `MicroBatch` and the router's `StepPlan`, what the executor sends each step
- `attention_actor.py`, `router_actor.py`, `shard_actor.py`: the Ray actors
"""

from expertmesh.actors.attention_actor import AttentionActor
from expertmesh.actors.router_actor import RouterActor
from expertmesh.actors.shard_actor import ExpertShardActor
from expertmesh.actors.step import MicroBatch, StepPlan

__all__ = ["AttentionActor", "ExpertShardActor", "MicroBatch", "RouterActor", "StepPlan"]
