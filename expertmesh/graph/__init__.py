"""The actor graph as an executor: one model replica on Ray actors.

- `deployment.py`: `DeploymentConfig`, how the replica is laid out (pure; no Ray)
- `planning.py`: pure step planning (which attention actor computes what; logits back in order)
- `builder.py`: starts and stops each actor in a placement group of its own
- `wiring.py`: sets up the data plane per transport
- `executor.py`: `ActorGraph` (the engine's executor factory) and `ActorGraphExecutor`
- `recovery.py`: replaces dead or stalled actors, with a deadline
- `placement_swap.py`: a new expert placement, loaded while serving and swapped in between steps
- `runtime.py`: the one place that starts or joins Ray

Importing this package does not import Ray; `ActorGraph` and `ActorGraphExecutor` load it when first used.
"""

from expertmesh.graph.deployment import ActorResources, DeploymentConfig

__all__ = ["ActorGraph", "ActorGraphExecutor", "ActorResources", "DeploymentConfig"]


def __getattr__(name: str):
    if name in ("ActorGraph", "ActorGraphExecutor"):
        from expertmesh.graph import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'expertmesh.graph' has no attribute {name!r}")
