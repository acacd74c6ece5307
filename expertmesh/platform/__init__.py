"""Control plane: deployment config, graph builder, expert placement and rebalancing, autoscaling, serving.

Landed so far: the deployment config (`deployment.py`) and the versioned expert placement table
(`placement.py`). The graph builder, the actors' wiring and the Ray Serve app come with the actor-graph and
serving issues.
"""

from expertmesh.platform.deployment import ActorResources, DeploymentConfig
from expertmesh.platform.placement import PlacementTable

__all__ = ["ActorResources", "DeploymentConfig", "PlacementTable"]
