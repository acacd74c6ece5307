"""The CPU decode kernels on bfloat16 weights and caches: they read bf16 as it is stored and sum in float32,
so against float32 math on the same bf16 values they are at least as close as torch's own bf16 path (the
reference functions run in bf16), and the cache rows they write are that float32 value rounded once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expertmesh import kernels
from expertmesh.kernels.cpu_ext import small_m_kernels
from expertmesh.kernels.cpu_linear import linear
from expertmesh.kernels.mla_absorbed import mla_decode_step_ref

pytestmark = pytest.mark.skipif(small_m_kernels() is None, reason="the C++ CPU kernels could not be built here")


def err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def test_linear_reads_bf16_weights():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 512, generator=gen).bfloat16(), torch.randn(1024, 512, generator=gen).bfloat16()
    bias = torch.randn(1024, generator=gen).bfloat16()
    exact = F.linear(x.float(), w.float(), bias.float())
    got = linear(x, w, bias)
    assert got.dtype == torch.bfloat16
    assert err(got, exact) <= 1.01 * err(F.linear(x, w, bias), exact) + 1e-6


def test_routed_experts_read_bf16_weights():
    gen = torch.Generator().manual_seed(1)
    w13, w2 = (torch.randn(16, 128, 128, generator=gen) * 0.05).bfloat16(), (torch.randn(16, 128, 64, generator=gen) * 0.05).bfloat16()
    x = torch.randn(5, 128, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(5)])
    weights = torch.rand(5, 4, generator=gen).bfloat16()
    exact = kernels.fused_moe_ref(x.float(), w13.float(), w2.float(), weights.float(), ids)
    got = kernels.fused_moe(x, w13, w2, weights, ids)
    assert got.dtype == torch.bfloat16
    assert err(got, exact) <= err(kernels.fused_moe_ref(x, w13, w2, weights, ids), exact)


def mla_inputs(dtype):
    gen = torch.Generator().manual_seed(2)
    b, h, nope, dr, rank, v, block = 3, 4, 32, 16, 64, 32, 4
    angles = torch.rand(b, dr // 2, generator=gen)
    tensors = [torch.randn(b, h, nope + dr, generator=gen), torch.randn(b, rank + dr, generator=gen),
               torch.rand(rank, generator=gen) + 0.5, angles.cos(), angles.sin(),
               torch.randn(h * (nope + v), rank, generator=gen) * 0.1, torch.randn(16, block, rank, generator=gen),
               torch.randn(16, block, dr, generator=gen)]
    q, kv_a, norm, cos, sin, kv_b, ckv, kpe = (t.bfloat16().to(dtype) for t in tensors)  # the same bf16 values
    slots, tables = torch.tensor([4, 24, 35]), torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    return [q, kv_a, norm, 1e-6, cos, sin, False, kv_b, ckv, kpe, slots, tables, torch.tensor([5, 9, 12]), 0.1]


def test_mla_decode_step_reads_and_writes_bf16_caches():
    exact_args, got_args, ref_args = mla_inputs(torch.float32), mla_inputs(torch.bfloat16), mla_inputs(torch.bfloat16)
    exact = mla_decode_step_ref(*exact_args)
    got = kernels.mla_decode_step(*got_args)
    assert got.dtype == torch.bfloat16
    assert err(got, exact) <= 1.01 * err(mla_decode_step_ref(*ref_args), exact) + 1e-6
    for i in (8, 9):  # the rows this step wrote: the float32 values rounded to bf16 once
        torch.testing.assert_close(got_args[i].float(), exact_args[i].bfloat16().float(), rtol=0, atol=0)


@pytest.mark.parametrize("rows, hidden", [(1, 768), (5, 384), (64, 100)])
def test_rms_norm_in_bf16_rounds_as_transformers_does(rows, hidden):
    """Normalised in float32, rounded to bf16, times the bf16 weight, rounded again: bit for bit transformers'."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    gen = torch.Generator().manual_seed(rows)
    norm = DeepseekV3RMSNorm(hidden, eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    x = (torch.randn(rows, hidden, generator=gen) * 3).bfloat16()
    with torch.inference_mode():
        got = kernels.rms_norm(x, norm.weight, 1e-6)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, norm(x))
        assert torch.equal(small_m_kernels().rms_norm_bf16(x, norm.weight, 1e-6), got)  # the kernel itself


@pytest.mark.parametrize("rows", [1, 2, 3])  # 1-2 rows pair bf16 products (vdpbf16ps where the CPU has it)
@pytest.mark.parametrize("k", [512, 200])  # 200: a tail past the 32-pair vectors
def test_bf16_activations_against_bf16_weights_sum_exact_products_in_float32(rows, k):
    gen = torch.Generator().manual_seed(rows + k)
    x, w = torch.randn(rows, k, generator=gen).bfloat16(), torch.randn(96, k, generator=gen).bfloat16()
    got = small_m_kernels().linear_small_m(x, w, None)
    assert got.dtype == torch.float32
    # every product of two bf16 values is exact in float32: only the order of the float32 sums differs
    torch.testing.assert_close(got, F.linear(x.double(), w.double()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_bf16_output_linear_rounds_as_torch_does(rows, with_bias):
    """linear_small_m_bf16 is linear_small_m(...).to(bf16) in one call: the same float32 sums, the bias added, each
    rounded once, bit for bit; sums that overflow to infinity and NaN included."""
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 256, generator=gen).bfloat16(), torch.randn(300, 256, generator=gen).bfloat16()
    bias = torch.randn(300, generator=gen).bfloat16() if with_bias else None
    w[1] = 3e38  # the sums overflow
    w[2, 0] = float("nan")
    kernels = small_m_kernels()
    want = kernels.linear_small_m(x, w, bias).to(torch.bfloat16)
    got = kernels.linear_small_m_bf16(x, w, bias)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert got.isnan()[:, 2].all() and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got.float()), torch.nan_to_num(want.float()))


def test_the_bf16_output_linear_rounds_ties_to_even():
    """Sums exactly halfway between two bf16 values round to the one with an even last bit, as torch rounds."""
    x, w = torch.ones(1, 16).bfloat16(), torch.zeros(3, 16).bfloat16()
    w[:, 0] = 1  # each sum is 1.0, then the float32 bias puts it halfway
    bias = torch.tensor([2.0 ** -8, 3 * 2.0 ** -8, -(2 + 2.0 ** -8)])
    got = small_m_kernels().linear_small_m_bf16(x, w, bias)
    assert got.float().tolist() == [[1.0, 1 + 2.0 ** -6, -1.0]]
    assert torch.equal(got, (F.linear(x.float(), w.float()) + bias).to(torch.bfloat16))


@pytest.mark.parametrize("name", ["linear_small_m", "linear_small_m_bf16"])
def test_the_linear_kernels_name_the_shapes_they_refuse(name):
    fn = getattr(small_m_kernels(), name)
    w = torch.ones(4, 8).bfloat16()
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weight \[N, K\] expected, got \[8\] and \[4, 8\]"):
        fn(torch.ones(8).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match=r"got \[2, 6\] and \[4, 8\]"):
        fn(torch.ones(2, 6).bfloat16(), w, None)


def test_slots_and_block_tables_outside_the_cache_are_refused_not_written():
    args = mla_inputs(torch.float32)
    args[10] = torch.tensor([4, 24, 16 * 4])  # one past the cache's 16 blocks of 4 rows
    with pytest.raises(RuntimeError, match=r"slot_mapping\[2\] = 64 is outside the cache's 64 rows"):
        kernels.mla_decode_step(*args)
    args = mla_inputs(torch.float32)
    args[11] = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 16]])  # block 16 of 16
    with pytest.raises(RuntimeError, match=r"block_tables\[2, 2\] = 16 is outside the cache's 16 blocks"):
        kernels.mla_decode_step(*args)
    args[11] = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 2**32 + 1]])  # block 1 if narrowed to int32 unchecked
    with pytest.raises(RuntimeError, match="block_tables holds values outside int32"):
        kernels.mla_decode_step(*args)
