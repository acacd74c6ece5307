"""What every actor of the graph does in its own process: torch threads, the CPU kernels, the device Ray
gave it, and where it runs (for the executor's placement decisions and for operators)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from expertmesh.kernels.cpu_ext import small_m_kernels


def setup(num_threads: int | None) -> ThreadPoolExecutor:
    """Sets torch's threads and loads the CPU kernels; returns the thread that runs this actor's per-step work.

    Ray runs a threaded actor's calls on whichever of its threads is free, and each new calling thread gets
    a fresh OpenMP team: steps measured 25% slower than on one long-lived thread."""
    if num_threads:
        torch.set_num_threads(num_threads)
    small_m_kernels()  # build (or load) the CPU kernels now, not during the first step
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")


def node_info() -> dict:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid()}


def device() -> str:
    """The actor's GPU when Ray gave it one (Ray sets CUDA_VISIBLE_DEVICES to it), else the CPU."""
    import ray

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
