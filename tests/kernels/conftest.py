"""Shared set-up of the kernel tests.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors; tests/conftest.py sets
``TRITON_INTERPRET`` for the whole session, before any test module can import triton.
"""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def needs_triton():
    """Skip the test cleanly when triton cannot be imported."""
    pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    """Each test starts from the default dispatch, whatever the caller's environment says."""
    monkeypatch.delenv("EXPERTMESH_KERNELS", raising=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ext():
    """The compiled CPU kernels (kernels/csrc); the test skips where they cannot be built."""
    from expertmesh.kernels.cpu_ext import small_m_kernels

    kernels = small_m_kernels()
    if kernels is None:
        pytest.skip("the C++ CPU kernels could not be built on this machine")
    return kernels
