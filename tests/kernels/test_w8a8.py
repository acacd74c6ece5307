"""int8 weights against int8-quantised activations (`quantization="w8a8"`): the activation quantiser's rounding
bound, the C++ linear against torch's own int8 x int8 matmul (`torch._int_mm`) run block by block, the routed
experts against the reference, and the refusal of sizes that do not quantise in blocks of 32."""

from __future__ import annotations

import pytest
import torch

from expertmesh import kernels
from expertmesh.kernels.int8_linear import KERNEL_MAX_ROWS

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def test_activations_round_each_block_of_32_to_within_half_a_step():
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0)) * 4
    x[1, 32:64] = 0.0
    got = kernels.quantize_activations_q8(x)
    d = x.view(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    assert bool(((got - x).view(3, 3, 32).abs() <= d / 2 + 1e-6).all())
    assert not got[1, 32:64].any()  # a zero block stays zero
    assert torch.equal(got.view(3, 3, 32).abs().amax(-1), x.view(3, 3, 32).abs().amax(-1))  # the max is exact


def int_mm_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x's blocks as int8 and d, each block's integer products summed by torch._int_mm, then scaled."""
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1) / 127  # [M, B]
    xq = torch.where(d[..., None] > 0, torch.round(blocks / d[..., None]), 0).to(torch.int8)
    out = torch.zeros(x.shape[0], q.shape[0], dtype=torch.float64)
    for b in range(blocks.shape[1]):
        sums = torch._int_mm(xq[:, b].contiguous(), q[:, b * 32:(b + 1) * 32].t().contiguous())  # [M, N] int32
        out += sums.double() * d[:, b, None].double()
    return (out * scale.double()).float()


@pytest.mark.parametrize("rows", [1, 3, 6, KERNEL_MAX_ROWS + 7])  # token blocks of 4 and their tails; prefill
@pytest.mark.parametrize("k", [256, 96])  # 96: the last 64-wide step holds one block
def test_w8a8_linear_equals_an_integer_matmul_block_by_block(rows, k):
    gen = torch.Generator().manual_seed(rows + k)
    q, scale = kernels.quantize_int8(torch.randn(72, k, generator=gen) * 0.05)
    x = torch.randn(rows, k, generator=gen) * 2
    x[0, :32] = 0.0
    got = kernels.linear_int8(x, q, scale, None, True)
    ref = kernels.linear_int8_ref(x, q, scale, None, True)
    want = int_mm_reference(x, q, scale)  # past KERNEL_MAX_ROWS, the reference's float math on the same blocks
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    bias = torch.randn(72, generator=gen)
    torch.testing.assert_close(kernels.linear_int8(x, q, scale, bias, True), got + bias, rtol=1e-5, atol=1e-5)
    exact = torch.nn.functional.linear(x, kernels.dequantize_int8(q, scale))
    assert float((got - exact).norm() / exact.norm()) < 0.02  # and close to float activations


@pytest.mark.parametrize("num_tokens", [1, 3, 32, 120])  # 120 x 4 pairs: past decode sizes, still the kernel
def test_w8a8_experts_equal_the_reference(num_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    E, H, inter, K = 16, 128, 96, 4
    (q13, s13), (q2, s2) = (kernels.quantize_int8(torch.randn(E, 2 * inter, H, generator=gen) * 0.05),
                            kernels.quantize_int8(torch.randn(E, H, inter, generator=gen) * 0.05))
    x = torch.randn(num_tokens, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, K, generator=gen) + 0.1
    got = kernels.fused_moe_int8(x, q13, s13, q2, s2, weights, ids, True)
    want = kernels.fused_moe_int8_ref(x, q13, s13, q2, s2, weights, ids, True)
    # the down projection's input is quantised after SiLU, whose last bit differs between C++ and torch: where
    # it lands on a rounding boundary, one activation moves a step (d); most elements agree to float rounding
    close = torch.isclose(got, want, rtol=1e-4, atol=1e-5)
    assert float(close.float().mean()) > 0.9 and float((got - want).norm() / want.norm()) < 2e-3
    float_acts = kernels.fused_moe_int8(x, q13, s13, q2, s2, weights, ids)
    assert not torch.equal(got, float_acts)  # the activations were quantised
    assert float((got - float_acts).norm() / float_acts.norm()) < 0.02


def test_sizes_that_do_not_quantise_in_blocks_of_32_are_refused():
    q, scale = kernels.quantize_int8(torch.randn(8, 40))
    with pytest.raises(ValueError, match="need the input size K to be a multiple of 32, got 40"):
        kernels.linear_int8(torch.randn(1, 40), q, scale, None, True)
    (q13, s13), (q2, s2) = kernels.quantize_int8(torch.randn(4, 48, 64)), kernels.quantize_int8(torch.randn(4, 64, 24))
    ids, weights = torch.tensor([[0, 1]]), torch.ones(1, 2)
    with pytest.raises(ValueError, match="need the expert intermediate size to be a multiple of 32, got 24"):
        kernels.fused_moe_int8(torch.randn(1, 64), q13, s13, q2, s2, weights, ids, True)
