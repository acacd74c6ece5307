import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from expertmesh.kernels import rms_norm_ref, rms_norm_triton

from .conftest import DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_matches_transformers_rmsnorm_bit_for_bit(dtype):
    norm = LlamaRMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40))
    norm = norm.to(dtype)
    x = torch.randn(3, 5, 40).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm_ref(x, norm.weight, 1e-5), norm(x), rtol=0, atol=0)


def test_ref_output_dtype_promotes_weight_and_input():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert rms_norm_ref(x, torch.ones(8), 1e-6).dtype == torch.float32
    assert rms_norm_ref(x, torch.ones(8, dtype=torch.bfloat16), 1e-6).dtype == torch.bfloat16


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("shape", [(1, 40), (3, 5, 40), (0, 16), (7, 128), (2, 3)])
@pytest.mark.parametrize(
    "dtype,weight_dtype,tol",
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.bfloat16, 2e-2),
        (torch.float16, torch.float16, 2e-3),
        (torch.bfloat16, torch.float32, 2e-2),
    ],
)
def test_triton_matches_ref(shape, dtype, weight_dtype, tol):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    weight = torch.randn(shape[-1], device=DEVICE).to(weight_dtype)
    expected = rms_norm_ref(x, weight, 1e-6)
    actual = rms_norm_triton(x, weight, 1e-6)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.usefixtures("needs_triton")
def test_triton_reads_non_contiguous_rows():
    x = torch.randn(6, 64, device=DEVICE)[:, :40]  # row stride 64
    x_t = torch.randn(40, 5, device=DEVICE).t()  # last-dim stride 5
    weight = torch.randn(40, device=DEVICE)
    for inp in (x, x_t):
        torch.testing.assert_close(rms_norm_triton(inp, weight, 1e-6), rms_norm_ref(inp, weight, 1e-6))


@pytest.mark.usefixtures("needs_triton")
def test_triton_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(torch.randn(2, 8, device=DEVICE), torch.ones(9, device=DEVICE), 1e-6)
