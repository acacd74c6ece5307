"""Which kernel family the environment asks for: EXPERTMESH_KERNELS = auto (default) | torch | triton.

A decode step dispatches ~150 kernel calls; reading the environment in each costs more than some of the
kernels. `pinned_backend()` reads it once for a whole forward pass (per thread: the attention actor runs two
micro-batches on two threads), and `kernel_backend()` inside it returns that reading.
"""

import contextlib
import os
import threading

BACKEND_ENV = "EXPERTMESH_KERNELS"
BACKENDS = ("auto", "torch", "triton")

_pinned = threading.local()


def _from_env() -> str:
    backend = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
    return backend


def kernel_backend() -> str:
    """``auto`` picks per call (Triton on CUDA, the CPU fast paths for CPU inference, else the torch
    references); ``torch`` always runs the plain torch references; ``triton`` always the Triton kernels."""
    backend = getattr(_pinned, "backend", None)
    return backend if backend is not None else _from_env()


@contextlib.contextmanager
def pinned_backend():
    """`kernel_backend()` read once on entry and held until exit, in this thread (nested: the outer reading)."""
    if getattr(_pinned, "backend", None) is not None:
        yield _pinned.backend
        return
    _pinned.backend = _from_env()
    try:
        yield _pinned.backend
    finally:
        _pinned.backend = None
