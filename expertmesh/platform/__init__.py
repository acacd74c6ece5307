"""Control plane: deployment config, graph builder, expert placement and rebalancing, autoscaling, serving.

Landed so far: the deployment config (`deployment.py`), the versioned expert placement table
(`placement.py`) and the graph builder with its executor (`graph.py`: imports Ray, so it is not imported
here). The Ray Serve app comes with the serving issue.
"""

from expertmesh.platform.deployment import ActorResources, DeploymentConfig
from expertmesh.platform.placement import PlacementTable

__all__ = ["ActorResources", "DeploymentConfig", "PlacementTable"]
