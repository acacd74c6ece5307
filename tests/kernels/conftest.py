"""Shared set-up of the kernel tests.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. triton reads
``TRITON_INTERPRET`` when it decorates a kernel, i.e. when a kernel module is first imported,
so it is set here, at collection time, before any test imports one.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
