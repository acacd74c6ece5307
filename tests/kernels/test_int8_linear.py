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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_reads_an_int8_kv_b_with_its_row_scales(dtype):
    """MLA's kv_b_proj as int8 (quantization="int8"): the absorbed kernels fold the row scales into the queries
    (W_UK) and the outputs (W_UV); against the reference on the dequantised kv_b, with float32 and bf16 caches."""
    from expertmesh.kernels.cpu_ext import small_m_kernels
    from expertmesh.kernels.mla_absorbed import mla_decode_absorbed_ref, mla_decode_step_ref

    if small_m_kernels() is None:
        pytest.skip("the C++ CPU kernels could not be built here")
    gen = torch.Generator().manual_seed(3)
    b, h, nope, dr, rank, v, block = 3, 4, 32, 16, 64, 32, 4
    q, kv_a = torch.randn(b, h, nope + dr, generator=gen), torch.randn(b, rank + dr, generator=gen)
    norm, angles = torch.rand(rank, generator=gen) + 0.5, torch.rand(b, dr // 2, generator=gen)
    kv_b_q, kv_b_scale = kernels.quantize_int8(torch.randn(h * (nope + v), rank, generator=gen) * 0.1)
    caches = [torch.randn(16, block, rank, generator=gen), torch.randn(16, block, dr, generator=gen)]
    slots, lens = torch.tensor([4, 24, 35]), torch.tensor([5, 9, 12])
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    cast = lambda t: t.to(dtype)  # noqa: E731
    got_caches, ref_caches = [cast(c.clone()) for c in caches], [cast(c.clone()) for c in caches]
    kv_b = kernels.dequantize_int8(kv_b_q, kv_b_scale, dtype)
    act = [cast(t) for t in (q, kv_a, norm, angles.cos(), angles.sin())]
    got = kernels.mla_decode_step(*act[:3], 1e-6, *act[3:], False, kv_b_q, *got_caches, slots, tables, lens, 0.1,
                                  kv_b_scale)
    want = mla_decode_step_ref(*act[:3], 1e-6, *act[3:], False, kv_b, *ref_caches, slots, tables, lens, 0.1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)
    q_nope, q_pe = cast(q[..., :nope]), cast(q[..., nope:])
    torch.testing.assert_close(
        kernels.mla_decode_absorbed(q_nope, q_pe, kv_b_q, *got_caches, tables, lens, 0.1, kv_b_scale),
        mla_decode_absorbed_ref(q_nope, q_pe, kv_b, *ref_caches, tables, lens, 0.1), **tol)
