"""The CPU serving fast paths (cpu_*.py) against the plain definitions and the references."""

import pytest
import torch
import torch.nn.functional as F

from expertmesh.kernels import fused_moe, mla_decode_attention, mla_decode_attention_ref
from expertmesh.kernels.cpu_fused_moe import fused_moe_cpu
from expertmesh.kernels.cpu_linear import ONEDNN_MAX_ROWS, ONEDNN_MIN_WEIGHT_ELEMENTS, linear, onednn_available
from expertmesh.kernels.cpu_mla_decode import mla_decode_attention_cpu

from .test_fused_moe import SHAPES, make_inputs, naive_moe


@pytest.mark.parametrize("rows", [1, 3, ONEDNN_MAX_ROWS, ONEDNN_MAX_ROWS + 5])
@pytest.mark.parametrize("out_features", [24, ONEDNN_MIN_WEIGHT_ELEMENTS // 40 + 3])
def test_linear_matches_f_linear_at_every_row_count(rows, out_features):
    x, w, b = torch.randn(rows, 40), torch.randn(out_features, 40), torch.randn(out_features)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_keeps_autograd_working():
    x, w = torch.randn(2, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, 8))


def test_onednn_is_available_on_this_build():
    # If this fails, serving silently falls back to MKL and loses its small-M speed: the bench would show it.
    assert onednn_available()


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_moe_cpu_matches_the_definition(shape):
    x, w13, w2, weights, ids = make_inputs(*shape)
    torch.testing.assert_close(fused_moe_cpu(x, w13, w2, weights, ids), naive_moe(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)


def test_fused_moe_cpu_handles_bf16_and_unused_experts():
    x, w13, w2, weights, ids = make_inputs(9, 40, 24, 12, 2, dtype=torch.bfloat16, used_experts=[1, 5, 6])
    out = fused_moe_cpu(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_moe(x, w13, w2, weights, ids).float(), rtol=3e-2, atol=3e-2)


def test_dispatch_takes_the_fast_path_only_without_autograd(monkeypatch):
    calls = []
    import expertmesh.kernels.registry as registry

    monkeypatch.setattr(registry, "fused_moe_cpu", lambda *a: calls.append(1) or fused_moe_cpu(*a))
    x, w13, w2, weights, ids = make_inputs(4, 16, 8, 5, 2)
    with torch.no_grad():
        fused_moe(x, w13, w2, weights, ids)
    assert calls == [1]
    w13.requires_grad_(True)
    fused_moe(x, w13, w2, weights, ids).sum().backward()
    assert calls == [1] and w13.grad is not None


def _paged(batch, heads, rank, rope, block_size, lens, dtype=torch.float32):
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    ckv = torch.randn(num_blocks, block_size, rank, dtype=dtype)
    kpe = torch.randn(num_blocks, block_size, rope, dtype=dtype)
    perm = torch.randperm(num_blocks).tolist()
    width = max(-(-n // block_size) for n in lens)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    for b, n in enumerate(lens):
        need = -(-n // block_size)
        tables[b, :need] = torch.tensor([perm.pop() for _ in range(need)], dtype=torch.int32)
    q = torch.randn(batch, heads, rank, dtype=dtype)
    qr = torch.randn(batch, heads, rope, dtype=dtype)
    return q, qr, ckv, kpe, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("lens,block_size", [([1], 16), ([37, 5, 16, 1], 16), ([9, 3], 4), ([33], 1)])
def test_mla_decode_cpu_matches_the_reference(lens, block_size):
    args = _paged(len(lens), 5, 24, 8, block_size, lens)
    torch.testing.assert_close(mla_decode_attention_cpu(*args, 0.3), mla_decode_attention_ref(*args, 0.3),
                               rtol=1e-5, atol=1e-5)


def test_mla_decode_dispatch_without_grad_uses_the_cpu_path():
    args = _paged(3, 4, 16, 8, 4, [7, 1, 12])
    with torch.no_grad():
        torch.testing.assert_close(mla_decode_attention(*args, 0.5), mla_decode_attention_ref(*args, 0.5))
