"""The one place that starts or joins Ray.

Importing this module sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported: without it, Ray
2.60 on Linux rewrites 127.0.0.1 to the machine's other interface, and servers meant for loopback would
listen elsewhere. Whatever imports Ray in expertmesh imports it through here first.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

ACTOR_NAMESPACE = "expertmesh"  # the graph's actors are named in it, for operators and tests


def connect(address: str | None = None, *, num_cpus: float = 0, log_to_driver: bool = False,
            worker_niceness: int | None = None) -> bool:
    """Joins `address` (or $RAY_ADDRESS), or starts a private local cluster on 127.0.0.1; True if this call
    started it (the caller then shuts it down). Already connected: nothing to do, False.

    A cluster started here declares at least `num_cpus` logical CPUs, so a deployment sized for a real
    cluster still fits on one machine (its actors spend much of a step waiting on one another). It is never
    whatever stale cluster Ray's `ray_current_cluster` file names (`address="local"`)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return False
    if worker_niceness is not None:  # Ray starts workers at niceness 15 unless told otherwise
        os.environ.setdefault("RAY_worker_niceness", str(worker_niceness))
    ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver,
             num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)))
    return True


def disconnect(started: bool) -> None:
    """Leaves Ray, shutting the cluster down if `connect` started it."""
    if started and ray.is_initialized():
        ray.shutdown()
