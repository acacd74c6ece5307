"""Int8 weight-only routed experts: the quantiser's rounding bound, and the serving paths (the C++ decode kernel
and the prefill path) against the reference, which runs `fused_moe_ref` over weights dequantised here."""

from __future__ import annotations

import pytest
import torch

from expertmesh import kernels

E, H, I, K = 16, 128, 64, 4


def experts(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * 0.05
    w2 = torch.randn(E, H, I, generator=gen) * 0.05
    w13[3, 5] = 0.0  # a row of zeros
    return w13, w2


def routing(num_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(num_tokens)])
    return x, torch.rand(num_tokens, K, generator=gen) + 0.1, ids


def test_quantize_rounds_each_row_to_within_half_a_step():
    w13, _ = experts()
    q, scale = kernels.quantize_int8(w13)
    assert q.dtype == torch.int8 and scale.shape == (E, 2 * I) and int(q.abs().max()) == 127
    err = (kernels.dequantize_int8(q, scale) - w13).abs()
    assert bool((err <= scale.unsqueeze(-1) / 2 + 1e-7).all())
    assert scale[3, 5] == 1.0 and not q[3, 5].any()  # a zero row stays zero


@pytest.mark.parametrize("num_tokens", [1, 3, 32, 200])  # decode sizes take the C++ kernel, 200 x 4 pairs do not
def test_serving_path_equals_the_reference(num_tokens):
    w13, w2 = experts()
    (q13, s13), (q2, s2) = kernels.quantize_int8(w13), kernels.quantize_int8(w2)
    x, weights, ids = routing(num_tokens, num_tokens)
    got = kernels.fused_moe_int8(x, q13, s13, q2, s2, weights, ids)
    want = kernels.fused_moe_ref(x, kernels.dequantize_int8(q13, s13), kernels.dequantize_int8(q2, s2), weights, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.fused_moe_int8_ref(x, q13, s13, q2, s2, weights, ids), want)
    exact = kernels.fused_moe_ref(x, w13, w2, weights, ids)  # and close to the float experts
    assert float((got - exact).norm() / exact.norm()) < 0.02


def test_bad_arguments_are_named():
    w13, w2 = experts()
    (q13, s13), (q2, s2) = kernels.quantize_int8(w13), kernels.quantize_int8(w2)
    x, weights, ids = routing(2, 0)
    with pytest.raises(ValueError, match="w13 must be int8, got torch.float32"):
        kernels.fused_moe_int8(x, w13, s13, q2, s2, weights, ids)
    with pytest.raises(ValueError, match=r"w2_scale must be float32 \(16, 128\), got torch.float32 \(16,\)"):
        kernels.fused_moe_int8(x, q13, s13, q2, s2[:, 0], weights, ids)
    with pytest.raises(ValueError, match=r"hidden_states must be \[T, H\]"):
        kernels.fused_moe_int8(x[0], q13, s13, q2, s2, weights, ids)
