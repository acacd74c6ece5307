"""Control plane: deployment config, graph builder, expert placement and rebalancing, autoscaling, serving.

Landed so far: the versioned expert placement table (`placement.py`). The actor graph, the deployment
config and the Ray Serve app come with the actor-graph and serving issues.
"""

from expertmesh.platform.placement import PlacementTable

__all__ = ["PlacementTable"]
