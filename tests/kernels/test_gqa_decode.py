"""Grouped-query decode attention over the paged cache: the compiled CPU kernel (csrc/gqa_decode.cpp) against the
torch reference, which gathers each context into a padded batch as the model did before the kernel."""

import pytest
import torch

from expertmesh import kernels
from expertmesh.kernels import gqa_decode_ref


def paged(lens, heads, kv_heads, head_dim, block, dtype=torch.float32, v_dim=None, garbage=float("nan"), seed=0):
    """Queries and a cache whose blocks are scattered, every slot no context covers (and every table entry past a
    context) holding garbage: (q, k_cache, v_cache, tables, lens, clean k_cache, clean v_cache)."""
    g = torch.Generator().manual_seed(seed)
    v_dim = v_dim or head_dim
    width = max(-(-n // block) for n in lens) + 1
    num_blocks = sum(-(-n // block) for n in lens) + 3
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(lens), width), 10**6, dtype=torch.int32)  # padding: no block at all
    k = torch.full((num_blocks, block, kv_heads, head_dim), garbage)
    v = torch.full((num_blocks, block, kv_heads, v_dim), garbage)
    clean_k, clean_v = torch.zeros_like(k), torch.zeros_like(v)
    used = 0
    for b, n in enumerate(lens):
        for i in range(-(-n // block)):
            blk = int(order[used])
            used += 1
            tables[b, i] = blk
            rows = min(block, n - i * block)
            kv = torch.randn(2, rows, kv_heads, max(head_dim, v_dim), generator=g)
            for cache, clean, dim, src in ((k, clean_k, head_dim, kv[0]), (v, clean_v, v_dim, kv[1])):
                cache[blk, :rows] = src[..., :dim]
                clean[blk, :rows] = src[..., :dim]
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    to = (lambda t: t.to(dtype))
    return q, to(k), to(v), tables, torch.tensor(lens, dtype=torch.int32), to(clean_k), to(clean_v)


CASES = [  # heads, kv_heads, head_dim, block, lens
    (4, 4, 16, 4, [1]),
    (8, 2, 24, 16, [37]),
    (6, 1, 16, 4, [200]),  # one sequence, one KV head: the context is cut into pieces and merged
    (8, 2, 32, 16, [5, 70, 16]),
    (4, 2, 20, 8, [130, 3, 64, 1, 99]),  # a head size past the last full vector
]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("window", [None, 1, 7, 64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}-kv{c[1]}-d{c[2]}-bs{c[3]}-{len(c[4])}seq")
def test_kernel_matches_the_reference(ext, case, window, cache_dtype):
    heads, kv_heads, head_dim, block, lens = case
    q, k, v, tables, ctx, clean_k, clean_v = paged(lens, heads, kv_heads, head_dim, block, cache_dtype)
    got = ext.gqa_decode_f32(q, k, v, tables, ctx, head_dim**-0.5, window or 0)
    # the reference reads the same values, widened to float32, from a cache without the garbage
    want = gqa_decode_ref(q, clean_k.float(), clean_v.float(), tables.clamp(max=k.shape[0] - 1), ctx,
                          head_dim**-0.5, window)
    assert torch.isfinite(got).all(), "garbage outside the contexts leaked in"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_values_of_another_size_than_the_keys(ext):
    q, k, v, tables, ctx, clean_k, clean_v = paged([9, 40], 4, 2, 16, 8, v_dim=24)
    want = gqa_decode_ref(q, clean_k, clean_v, tables.clamp(max=k.shape[0] - 1), ctx, 0.3)
    torch.testing.assert_close(ext.gqa_decode_f32(q, k, v, tables, ctx, 0.3, 0), want, rtol=1e-5, atol=1e-5)


def test_the_result_does_not_depend_on_the_thread_count(ext):
    """The number of context pieces follows the thread count; the merged result must not."""
    q, k, v, tables, ctx, *_ = paged([300, 7], 8, 2, 32, 16)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            results.append(ext.gqa_decode_f32(q, k, v, tables, ctx, 0.2, 0))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-5, atol=1e-6)


def test_a_table_entry_outside_the_cache_is_refused(ext):
    q, k, v, tables, ctx, *_ = paged([20], 4, 2, 16, 8)
    tables[0, 1] = k.shape[0]
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 1\].*outside the cache"):
        ext.gqa_decode_f32(q, k, v, tables, ctx, 0.25, 0)


@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_dispatch_takes_the_kernel_on_cpu_inference(ext, monkeypatch, q_dtype, cache_dtype):
    import expertmesh.kernels.registry as registry

    q, k, v, tables, ctx, clean_k, clean_v = paged([12, 33], 8, 4, 16, 4, cache_dtype, garbage=0.0)
    want = gqa_decode_ref(q.to(q_dtype), clean_k, clean_v, tables.clamp(max=k.shape[0] - 1), ctx, 0.25, 5)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran where the kernel applies")

    monkeypatch.setattr(registry, "gqa_decode_ref", refuse)
    with torch.no_grad():
        got = kernels.gqa_decode(q.to(q_dtype), k, v, tables, ctx, 0.25, 5)
    assert got.dtype == q_dtype
    tol = 1e-5 if q_dtype == cache_dtype == torch.float32 else 2e-2  # the reference's bf16 matmuls round
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_autograd_takes_the_reference(monkeypatch):
    import expertmesh.kernels.registry as registry

    calls = []
    monkeypatch.setattr(registry, "gqa_decode_ref", lambda *a: calls.append(1) or gqa_decode_ref(*a))
    q, k, v, tables, ctx, *_ = paged([6], 4, 2, 16, 4, garbage=0.0)
    q.requires_grad_(True)
    kernels.gqa_decode(q, k, v, tables, ctx, 0.25).sum().backward()
    assert calls == [1] and q.grad is not None


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "q": a["q"][0]}, "q must be"),
    (lambda a: {**a, "k_cache": a["k_cache"][..., :8]}, "k_cache must be"),
    (lambda a: {**a, "q": a["q"][:, :3]}, "multiple of k_cache's 2 KV heads"),
    (lambda a: {**a, "v_cache": a["v_cache"][:, :2]}, "v_cache must be"),
    (lambda a: {**a, "block_tables": a["block_tables"][:1]}, "block_tables must be"),
    (lambda a: {**a, "context_lens": a["context_lens"][:1]}, "context_lens must be"),
    (lambda a: {**a, "window": 0}, "window must be"),
])
def test_bad_arguments_are_named(change, match):
    q, k, v, tables, ctx, *_ = paged([5, 9], 4, 2, 16, 4, garbage=0.0)
    args = change(dict(q=q, k_cache=k, v_cache=v, block_tables=tables, context_lens=ctx, scale=0.25, window=None))
    for fn in (kernels.gqa_decode, gqa_decode_ref):
        with torch.no_grad(), pytest.raises(ValueError, match=match):
            fn(**args)
