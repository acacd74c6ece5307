"""Ray actors of one model replica and the data plane between them.

- `attention.py`: `AttentionWorker` (the model without its routed experts, the paged cache, two micro-batches)
- `router.py`: `RouterCore` (gates, placement, load counts; conducts a step's layers)
- `expert_shard.py`: `ExpertShard` (some (layer, expert) pairs and their math) and its gRPC service
- `dispatch.py`: router -> shards transports (in-process, gRPC, torch.distributed)
- `router_link.py`: attention actors <-> router transports (gRPC, torch.distributed)
- `ray_actors.py`: `AttentionActor`, `RouterActor`, `ExpertShardActor`, made Ray actors by `platform.graph`
"""
