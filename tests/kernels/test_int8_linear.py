"""Int8 weight-only linears against torch's own weight-only int8 matmul (`torch._weight_int8pack_mm`: int8
weights [N, K] with one scale per output row, the same contract), on the C++ decode kernel's row counts, past
its K tail, with a bias, and on the prefill path; in float32 and bfloat16 activations."""

from __future__ import annotations

import pytest
import torch

from expertmesh import kernels
from expertmesh.kernels.int8_linear import KERNEL_MAX_ROWS


def weights(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return kernels.quantize_int8(torch.randn(n, k, generator=gen) * 0.05)


@pytest.mark.parametrize("rows", [1, 3, 8, 33, KERNEL_MAX_ROWS + 7])  # the kernel's row blocks, then prefill
@pytest.mark.parametrize("k", [256, 200])  # 200: a tail past the 16-lane vectors
def test_int8_linear_equals_torchs_weight_only_int8_matmul(rows, k):
    q, scale = weights(96, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    want = torch._weight_int8pack_mm(x, q, scale)
    torch.testing.assert_close(kernels.linear_int8(x, q, scale), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.linear_int8_ref(x, q, scale), want, rtol=1e-5, atol=1e-5)
    bias = torch.randn(96)
    torch.testing.assert_close(kernels.linear_int8(x, q, scale, bias), want + bias, rtol=1e-5, atol=1e-5)
    # leading dimensions are kept, as F.linear keeps them
    assert kernels.linear_int8(x.view(1, rows, k), q, scale).shape == (1, rows, 96)


def test_bfloat16_activations_sum_in_float32_and_round_once():
    q, scale = weights(64, 128, seed=1)
    x = torch.randn(4, 128).bfloat16()
    want = torch._weight_int8pack_mm(x.float(), q, scale)
    for path in (kernels.linear_int8, kernels.linear_int8_ref):
        got = path(x, q, scale)
        assert got.dtype == torch.bfloat16
        # within half a bf16 step of the float32 result (plus the sums' own rounding): rounded once, at the end
        assert bool(((got.float() - want).abs() <= want.abs() * 2.0**-8 + 1e-6).all())


def test_bad_arguments_are_named():
    q, scale = weights(32, 64)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"weight must be a 2-D int8 tensor \[N, K\], got torch.float32"):
        kernels.linear_int8(x, q.float(), scale)
    with pytest.raises(ValueError, match=r"scale must be float32 \(32,\), got torch.float32 \(31,\)"):
        kernels.linear_int8(x, q, scale[:31])
    with pytest.raises(ValueError, match=r"x's last dimension \(63\) must equal the weight's K \(64\)"):
        kernels.linear_int8(x[:, :63], q, scale)
    with pytest.raises(ValueError, match=r"bias must be \(32,\)"):
        kernels.linear_int8(x, q, scale, torch.zeros(3))
