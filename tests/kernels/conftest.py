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
