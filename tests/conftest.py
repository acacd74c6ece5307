"""Fixtures shared by every test directory."""

import os

# Before anything imports Ray: otherwise Ray on Linux rewrites 127.0.0.1 to another interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA the Triton kernels run in Triton's interpreter. triton.language reads TRITON_INTERPRET when it is
# first imported, and a test module collected before tests/kernels may import it (through transformers, peft
# or torch's own integrations): set it here, before any test module is imported. Only the kernel tests (and
# EXPERTMESH_KERNELS=triton) run Triton on a CPU; the engine's CPU paths never do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from expertmesh.testing import write_random_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The `tiny` preset (random weights, seed 0, float32, real tokenizer and chat template), written
    once per session. Treat it as read-only: copy it before writing anything into it."""
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="module")
def single_threaded_torch():
    """Run a module's CPU forward passes on one intra-op thread.

    Tiny models gain nothing from more threads, and on a loaded shared CPU OpenMP's spinning workers
    make each op up to ~100x slower. Restores the previous setting afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
