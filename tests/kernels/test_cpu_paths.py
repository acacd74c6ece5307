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


# --- the compiled CPU kernels (csrc/) against the references ---------------------------------------------

from expertmesh.kernels import mla_decode_absorbed_ref, rms_norm_ref, topk_gating_ref  # noqa: E402


# 16-64 rows put the tokens in a register's lanes (tokens_in_lanes.h): 1-4 vectors of them, some lanes past the
# last token, row counts that leave a remainder after the row blocks (8, 12, 8 or 6 rows by 1-4 vectors)
@pytest.mark.parametrize("rows,k,n", [(1, 40, 24), (3, 768, 130), (5, 16, 1), (15, 64, 30), (16, 37, 9),
                                      (17, 768, 130), (32, 37, 9), (33, 64, 50), (48, 40, 31), (64, 33, 27),
                                      (65, 40, 13)])
def test_ext_linear_matches_f_linear(ext, rows, k, n):
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    torch.testing.assert_close(ext.linear_small_m(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_ext_moe_matches_the_definition(ext, shape):
    x, w13, w2, weights, ids = make_inputs(*shape)
    torch.testing.assert_close(ext.moe_small_m(x, w13, w2, weights, ids), naive_moe(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ext_streaming_results_do_not_depend_on_how_threads_share_the_rows(ext, dtype):
    """The weight-streaming kernels split their rows across however many threads there are (for_group_rows):
    every row must be computed, once, the same way, whatever the split. Each thread count's result must equal
    the one-thread result bit for bit (more threads than cores included)."""
    # one bf16 row: the vdpbf16ps path; the experts take float32 activations over bf16 weights
    x = torch.randn(3, 768) if dtype == torch.float32 else torch.randn(1, 768, dtype=dtype)
    w, b = torch.randn(1100, 768).to(dtype), torch.randn(1100)
    many = torch.randn(20, 768)  # float32 rows in lanes (tokens_in_lanes.h)
    moe_in = make_inputs(5, 256, 320, 16, 4, dtype=dtype)
    moe_in = (moe_in[0].float(), *moe_in[1:])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want_linear, want_moe = ext.linear_small_m(x, w, b), ext.moe_small_m(*moe_in)
        want_many = ext.linear_small_m(many, w, b)
        for n in (2, 3, 5):
            torch.set_num_threads(n)
            for _ in range(4):
                assert torch.equal(ext.linear_small_m(x, w, b), want_linear), n
                assert torch.equal(ext.moe_small_m(*moe_in), want_moe), n
                assert torch.equal(ext.linear_small_m(many, w, b), want_many), n
    finally:
        torch.set_num_threads(threads)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(want_linear.float(), F.linear(x.float(), w.float(), b.float()), rtol=tol, atol=tol)
    torch.testing.assert_close(want_many, F.linear(many, w.float(), b.float()), rtol=tol, atol=tol)
    x_e, w13, w2, weights, ids = moe_in
    torch.testing.assert_close(want_moe, naive_moe(x_e, w13.float(), w2.float(), weights, ids), rtol=tol, atol=tol)


def test_ext_moe_rejects_out_of_range_expert_ids(ext):
    x, w13, w2, weights, ids = make_inputs(2, 16, 8, 5, 2)
    ids[1, 0] = 5
    with pytest.raises(RuntimeError, match="outside"):
        ext.moe_small_m(x, w13, w2, weights, ids)


def test_ext_rms_norm_matches_the_reference(ext):
    x, w = torch.randn(7, 3, 40), torch.randn(40)
    torch.testing.assert_close(ext.rms_norm_f32(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(scoring_func="softmax"),
    dict(scoring_func="softmax", renormalize=True),
    dict(scoring_func="softmax", n_group=4, topk_group=2, group_score="max", scaling_factor=1.7),
    dict(scoring_func="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", renormalize=True,
         scaling_factor=2.5, bias=True),
    dict(scoring_func="sigmoid", bias=True),
])
def test_ext_gating_selects_the_same_experts_as_the_reference(ext, kwargs):
    kwargs = dict(kwargs)
    bias = torch.randn(16) * 0.1 if kwargs.pop("bias", False) else None
    logits = torch.randn(37, 16)
    ref_w, ref_ids = topk_gating_ref(logits, 3, correction_bias=bias, **kwargs)
    w, ids = ext.topk_gating_f32(logits, 3, kwargs.get("scoring_func") == "sigmoid", bias, kwargs.get("n_group", 1),
                                 kwargs.get("topk_group", 1), kwargs.get("group_score") == "top2_sum",
                                 kwargs.get("renormalize", False), kwargs.get("scaling_factor", 1.0))
    ref_sorted, order = ref_ids.sort(-1)
    ext_sorted, ext_order = ids.sort(-1)
    assert torch.equal(ext_sorted, ref_sorted)
    torch.testing.assert_close(w.gather(-1, ext_order), ref_w.gather(-1, order), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lens,block_size", [([1], 16), ([37, 5, 16, 1], 16), ([9, 3], 4)])
def test_ext_mla_absorbed_matches_the_reference(ext, lens, block_size):
    q_latent, q_rope, ckv, kpe, tables, ctx = _paged(len(lens), 5, 24, 8, block_size, lens)
    heads, nope, v = 5, 12, 10
    q_nope = torch.randn(len(lens), heads, nope)
    kv_b = torch.randn(heads * (nope + v), 24) / 5
    expected = mla_decode_absorbed_ref(q_nope, q_rope, kv_b, ckv, kpe, tables, ctx, 0.3)
    torch.testing.assert_close(ext.mla_decode_absorbed_f32(q_nope, q_rope, kv_b, ckv, kpe, tables, ctx, 0.3),
                               expected, rtol=1e-5, atol=1e-5)


# Eight heads or more take the heads-in-lanes form (csrc/mla_context.h): a context read block by block with an
# online softmax, a few sequences' contexts cut into pieces and merged, more heads than a register's 16 lanes in
# groups, a latent width past the last full vector, bf16 caches widened as they are read.
@pytest.mark.parametrize("heads", [8, 17, 20])  # 17: two groups of unequal size (9 and 8 heads)
@pytest.mark.parametrize("lens,block_size", [([1], 16), ([200], 16), ([37, 5, 16, 1, 90], 16), ([9, 3], 4)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_ext_mla_absorbed_in_lanes_matches_the_reference(ext, heads, lens, block_size, cache_dtype):
    rank, rope, nope, v = 40, 8, 12, 10
    q_latent, q_rope, ckv, kpe, tables, ctx = _paged(len(lens), heads, rank, rope, block_size, lens)
    ckv, kpe = ckv.to(cache_dtype), kpe.to(cache_dtype)
    q_nope = torch.randn(len(lens), heads, nope) * 3  # peaked softmaxes: a later block's larger maximum rescales
    kv_b = torch.randn(heads * (nope + v), rank) / 5
    expected = mla_decode_absorbed_ref(q_nope, q_rope, kv_b, ckv.float(), kpe.float(), tables, ctx, 0.3)
    got = ext.mla_decode_absorbed_f32(q_nope, q_rope, kv_b, ckv, kpe, tables, ctx, 0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# Every stored form the serving engine keeps (kv_b float32, bf16 or int8; caches float32 or bf16; activations
# float32 or bf16) reaches the compiled kernel, never the torch reference, and gives the reference's numbers.
@pytest.mark.parametrize("kv_b_kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_mla_dispatch_takes_the_kernel_for_every_stored_form(ext, monkeypatch, kv_b_kind, cache_dtype, act_dtype):
    from expertmesh.kernels import int8_moe, registry

    heads, rank, rope, nope, v, lens = 8, 32, 8, 16, 16, [19, 3]
    q_latent, q_rope, ckv, kpe, tables, ctx = _paged(len(lens), heads, rank, rope, 4, lens)
    ckv, kpe = ckv.to(cache_dtype), kpe.to(cache_dtype)
    q_nope, q_rope = torch.randn(len(lens), heads, nope).to(act_dtype), q_rope.to(act_dtype)
    kv_b, scale = torch.randn(heads * (nope + v), rank) / 5, None
    if kv_b_kind == "int8":
        kv_b, scale = int8_moe.quantize_int8(kv_b)
        scale = scale.reshape(-1)
    else:
        kv_b = kv_b.to(getattr(torch, kv_b_kind))
    wide_kv_b = kv_b.float() if scale is None else int8_moe.dequantize_int8(kv_b, scale)
    expected = mla_decode_absorbed_ref(q_nope.float(), q_rope.float(), wide_kv_b, ckv.float(), kpe.float(), tables,
                                       ctx, 0.3)

    def no_reference(*args, **kwargs):
        raise AssertionError("the torch reference ran")

    monkeypatch.setattr(registry, "mla_decode_absorbed_ref", no_reference)
    with torch.no_grad():
        got = registry.mla_decode_absorbed(q_nope, q_rope, kv_b, ckv, kpe, tables, ctx, 0.3, scale)
    assert got.dtype == act_dtype
    rtol = 1e-5 if act_dtype == torch.float32 else 2**-7  # bf16: the float32 result rounded, one step either way
    torch.testing.assert_close(got, expected.to(act_dtype), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("interleave", [True, False])
def test_ext_mla_decode_step_matches_the_reference_including_cache_writes(ext, interleave):
    from expertmesh.kernels import mla_decode_step_ref

    lens = [9, 1, 17]
    _, _, ckv, kpe, tables, ctx = _paged(len(lens), 5, 24, 8, 4, lens)
    heads, nope, v, rank, rope = 5, 12, 10, 24, 8
    q = torch.randn(len(lens), heads, nope + rope)
    kv_a = torch.randn(len(lens), rank + rope)
    norm_w, cos, sin = torch.rand(rank) + 0.5, torch.randn(len(lens), rope // 2), torch.randn(len(lens), rope // 2)
    kv_b = torch.randn(heads * (nope + v), rank) / 5
    # Each sequence's new token is its last context position.
    slots = torch.tensor([int(tables[b, (n - 1) // 4]) * 4 + (n - 1) % 4 for b, n in enumerate(lens)])
    caches_ref, caches_ext = (ckv.clone(), kpe.clone()), (ckv.clone(), kpe.clone())
    expected = mla_decode_step_ref(q, kv_a, norm_w, 1e-6, cos, sin, interleave, kv_b, *caches_ref, slots, tables,
                                   ctx, 0.3)
    got = ext.mla_decode_step_f32(q, kv_a, norm_w, 1e-6, cos, sin, interleave, kv_b, *caches_ext, slots, tables,
                                  ctx, 0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches_ext, caches_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
