import math

import pytest
import torch

from expertmesh.kernels import mla_decode_attention_ref, mla_decode_attention_triton

from .conftest import DEVICE


def make_paged(context_lens, heads, rank, rope_dim, page_size, dtype=torch.float32, device="cpu"):
    """Per-sequence contiguous caches and the same tokens scattered over randomly permuted pages.

    Unused slots hold NaN and table padding is -1: neither may leak into the result.
    Returns ``(paged_inputs, contiguous ckv list, contiguous kpe list)``.
    """
    batch = len(context_lens)
    max_pages = max(1, max(-(-n // page_size) for n in context_lens))
    num_pages = batch * max_pages + 3  # a few pages nobody owns
    ckv_cache = torch.full((num_pages, page_size, rank), float("nan"))
    kpe_cache = torch.full((num_pages, page_size, rope_dim), float("nan"))
    block_tables = torch.full((batch, max_pages), -1, dtype=torch.int32)
    free_pages = torch.randperm(num_pages).tolist()
    ckv_seqs, kpe_seqs = [], []
    for b, length in enumerate(context_lens):
        ckv_seqs.append(torch.randn(length, rank).to(dtype).float())
        kpe_seqs.append(torch.randn(length, rope_dim).to(dtype).float())
        for t in range(length):
            if t % page_size == 0:
                block_tables[b, t // page_size] = free_pages.pop()
            page = block_tables[b, t // page_size]
            ckv_cache[page, t % page_size] = ckv_seqs[b][t]
            kpe_cache[page, t % page_size] = kpe_seqs[b][t]
    q_latent = torch.randn(batch, heads, rank)
    q_rope = torch.randn(batch, heads, rope_dim)
    inputs = [q_latent, q_rope, ckv_cache, kpe_cache]
    inputs = [t.to(device=device, dtype=dtype) for t in inputs]
    inputs += [block_tables.to(device), torch.tensor(context_lens, dtype=torch.int32, device=device)]
    return inputs, ckv_seqs, kpe_seqs


def naive_attention(q_latent, q_rope, ckv_seqs, kpe_seqs, scale):
    """Un-paged attention, one sequence and head at a time."""
    out = torch.zeros(q_latent.shape, dtype=torch.float32)
    for b, (ckv, kpe) in enumerate(zip(ckv_seqs, kpe_seqs)):
        if len(ckv) == 0:
            continue
        for h in range(q_latent.shape[1]):
            scores = scale * (ckv @ q_latent[b, h].float().cpu() + kpe @ q_rope[b, h].float().cpu())  # [L]
            out[b, h] = scores.softmax(-1) @ ckv
    return out


# (context_lens, heads, rank, rope_dim, page_size)
SHAPES = [
    ([5], 1, 16, 8, 4),
    ([7, 1, 19], 3, 24, 8, 4),
    ([45, 0, 33], 17, 32, 16, 16),  # > 32 tokens (several chunks), an empty sequence, two head blocks
]


@pytest.mark.parametrize("context_lens,heads,rank,rope_dim,page_size", SHAPES)
def test_ref_matches_naive_unpaged_attention(context_lens, heads, rank, rope_dim, page_size):
    inputs, ckv_seqs, kpe_seqs = make_paged(context_lens, heads, rank, rope_dim, page_size)
    scale = 1 / math.sqrt(rank + rope_dim)
    expected = naive_attention(inputs[0], inputs[1], ckv_seqs, kpe_seqs, scale)
    torch.testing.assert_close(mla_decode_attention_ref(*inputs, scale), expected, rtol=1e-5, atol=1e-5)


def test_ref_rejects_mismatched_cache():
    inputs, _, _ = make_paged([3], 2, 16, 8, 4)
    inputs[3] = inputs[3][..., :4]
    with pytest.raises(ValueError, match="kpe_cache"):
        mla_decode_attention_ref(*inputs, 0.1)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("context_lens,heads,rank,rope_dim,page_size", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_matches_ref(context_lens, heads, rank, rope_dim, page_size, dtype, tol):
    inputs, _, _ = make_paged(context_lens, heads, rank, rope_dim, page_size, dtype=dtype, device=DEVICE)
    scale = 1 / math.sqrt(rank + rope_dim)
    expected = mla_decode_attention_ref(*inputs, scale)
    actual = mla_decode_attention_triton(*inputs, scale)
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.usefixtures("needs_triton")
def test_triton_pads_rank_to_a_power_of_two():
    inputs, _, _ = make_paged([6, 9], 2, 20, 5, 8, device=DEVICE)
    torch.testing.assert_close(mla_decode_attention_triton(*inputs, 0.3), mla_decode_attention_ref(*inputs, 0.3))


@pytest.mark.usefixtures("needs_triton")
def test_triton_reads_caches_that_are_views_of_one_buffer():
    inputs, _, _ = make_paged([6, 9], 3, 16, 8, 4, device=DEVICE)
    combined = torch.cat([inputs[2], inputs[3]], dim=-1)  # [N, page, R + Dr], one allocation
    inputs[2], inputs[3] = combined[..., :16], combined[..., 16:]
    torch.testing.assert_close(mla_decode_attention_triton(*inputs, 0.3), mla_decode_attention_ref(*inputs, 0.3))
