"""Which kernel family the environment asks for: EXPERTMESH_KERNELS = auto (default) | torch | triton."""

import os

BACKEND_ENV = "EXPERTMESH_KERNELS"
BACKENDS = ("auto", "torch", "triton")


def kernel_backend() -> str:
    """``auto`` picks per call (Triton on CUDA, the CPU fast paths for CPU inference, else the torch
    references); ``torch`` always runs the plain torch references; ``triton`` always the Triton kernels."""
    backend = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
    return backend
