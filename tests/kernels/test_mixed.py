"""bf16 weights under float32 activations (`activation_dtype`): `linear_mixed` and `fused_moe_mixed` against torch
over the same numbers, the input rounded to bf16 and everything after it float32 (llama.cpp's matmul for a bf16
GGUF), on the decode-size kernels and past them; the outputs keep float32's precision (never rounded to bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expertmesh import kernels

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def _carries_float32_bits(out: torch.Tensor) -> bool:
    return not torch.equal(out, out.bfloat16().float())


@pytest.mark.parametrize("rows", [1, 3, 70])  # dpbf16, widened weights, and past the kernel (a prefill)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_linear_mixed_rounds_the_input_only(monkeypatch, rows, backend):
    monkeypatch.setenv("EXPERTMESH_KERNELS", backend)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g)
    w = torch.randn(80, 96, generator=g).bfloat16()
    b = torch.randn(80, generator=g).bfloat16()
    with torch.inference_mode():
        out = kernels.linear_mixed(x, w, b)
    want = F.linear(x.bfloat16().float(), w.float(), b.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert _carries_float32_bits(out)


@pytest.mark.parametrize("tokens", [1, 5, 90])  # 90 x top-6: past the decode kernel's pairs
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_moe_mixed_rounds_the_input_only(monkeypatch, tokens, backend):
    monkeypatch.setenv("EXPERTMESH_KERNELS", backend)
    g = torch.Generator().manual_seed(tokens)
    experts, hidden, inter, top_k = 8, 64, 32, 6
    x = torch.randn(tokens, hidden, generator=g)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / 8).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, generator=g) / 8).bfloat16()
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    with torch.inference_mode():
        out = kernels.fused_moe_mixed(x, w13, w2, weights, ids)
    want = kernels.fused_moe_ref(x.bfloat16().float(), w13.float(), w2.float(), weights, ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert _carries_float32_bits(out)
