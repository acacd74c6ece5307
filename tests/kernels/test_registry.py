import subprocess
import sys
import textwrap

import pytest
import torch

import expertmesh.kernels as kernels
from expertmesh.kernels import fused_moe, kernel_backend, mla_decode_attention, rms_norm, topk_gating, use_triton

from .conftest import DEVICE
from .test_fused_moe import make_inputs
from .test_mla_decode import make_paged


def test_all_names_are_exported():
    for name in kernels.__all__:
        assert hasattr(kernels, name), name


@pytest.mark.parametrize("value,backend", [(None, "auto"), ("", "auto"), ("torch", "torch"), (" Triton ", "triton")])
def test_backend_read_from_environment(monkeypatch, value, backend):
    if value is not None:
        monkeypatch.setenv("EXPERTMESH_KERNELS", value)
    assert kernel_backend() == backend


def test_a_pinned_backend_is_read_once_per_thread_and_released(monkeypatch):
    import threading

    from expertmesh.kernels.backend import pinned_backend

    monkeypatch.setenv("EXPERTMESH_KERNELS", "torch")
    seen = []
    with pinned_backend() as backend:
        assert backend == "torch"
        monkeypatch.setenv("EXPERTMESH_KERNELS", "auto")  # read on entry: a pass keeps one backend throughout
        assert kernel_backend() == "torch"
        with pinned_backend() as inner:  # nested: the outer reading
            assert inner == "torch"
        assert kernel_backend() == "torch"
        other = threading.Thread(target=lambda: seen.append(kernel_backend()))
        other.start()
        other.join()
    assert seen == ["auto"]  # another thread reads the environment for itself
    assert kernel_backend() == "auto"  # released on exit
    monkeypatch.setenv("EXPERTMESH_KERNELS", "cuda")
    with pytest.raises(ValueError, match="EXPERTMESH_KERNELS"), pinned_backend():
        pass
    monkeypatch.setenv("EXPERTMESH_KERNELS", "auto")
    assert kernel_backend() == "auto"  # the refused reading was not left pinned


def test_unknown_backend_is_rejected_by_name(monkeypatch):
    monkeypatch.setenv("EXPERTMESH_KERNELS", "cuda")
    with pytest.raises(ValueError, match="EXPERTMESH_KERNELS"):
        use_triton(torch.ones(1))


def test_cpu_tensors_take_the_torch_path_by_default():
    assert not use_triton(torch.ones(1), None)


@pytest.mark.usefixtures("needs_triton")
def test_environment_forces_either_backend(monkeypatch):
    monkeypatch.setenv("EXPERTMESH_KERNELS", "triton")
    assert use_triton(torch.ones(1))
    monkeypatch.setenv("EXPERTMESH_KERNELS", "torch")
    assert not use_triton(torch.ones(1, device=DEVICE))


def _call_all_ops():
    x = torch.randn(3, 40, device=DEVICE)
    logits = torch.randn(3, 8, device=DEVICE)
    moe_inputs = make_inputs(3, 40, 24, 7, 2, device=DEVICE)
    mla_inputs, _, _ = make_paged([5, 2], 3, 16, 8, 4, device=DEVICE)
    return [
        rms_norm(x, torch.ones(40, device=DEVICE), 1e-6),
        *topk_gating(logits, 2, n_group=4, topk_group=2, renormalize=True),
        fused_moe(*moe_inputs),
        mla_decode_attention(*mla_inputs, 0.2),
    ]


@pytest.mark.usefixtures("needs_triton")
def test_forced_triton_and_torch_agree_through_the_public_functions(monkeypatch):
    monkeypatch.setenv("EXPERTMESH_KERNELS", "torch")
    torch.manual_seed(1)
    expected = _call_all_ops()
    monkeypatch.setenv("EXPERTMESH_KERNELS", "triton")
    torch.manual_seed(1)
    actual = _call_all_ops()
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_default_dispatch():
    x, w13, w2, weights, ids = make_inputs(4, 16, 8, 5, 2)
    for t in (x, w13, w2, weights):
        t.requires_grad_(True)
    fused_moe(x, w13, w2, weights, ids).sum().backward()
    assert all(t.grad is not None for t in (x, w13, w2, weights))


def test_package_imports_and_runs_without_triton():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import os, torch
        import expertmesh.kernels as k
        assert not k.triton_available()
        out = k.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
        assert out.shape == (2, 8)
        os.environ["EXPERTMESH_KERNELS"] = "triton"
        try:
            k.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
        except RuntimeError as e:
            assert "triton" in str(e)
        else:
            raise AssertionError("forcing triton without triton must fail")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("needs_triton")
def test_cuda_inputs_take_triton_unless_autograd_records():
    x = torch.randn(2, 8, device="cuda")
    w = torch.ones(8, device="cuda", requires_grad=True)
    assert not use_triton(x, w)
    with torch.no_grad():
        assert use_triton(x, w)
