"""The machine a benchmark ran on, recorded with its results."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine(**versions: str) -> dict:
    """CPU model, cores, RAM, torch's threads, Python and torch versions, plus the peers' `versions`."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_gib, 1), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, **versions,
    }
