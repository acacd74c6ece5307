import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

from expertmesh.kernels import fused_moe_ref, fused_moe_triton, moe_align_block_size

from .conftest import DEVICE

# (T, H, I, E, K): odd sizes, a single token, no tokens, more experts than pairs.
SHAPES = [(0, 40, 24, 7, 2), (1, 40, 24, 7, 1), (3, 40, 24, 7, 3), (17, 40, 24, 7, 3), (5, 16, 8, 64, 2)]


def make_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype=torch.float32, ids_dtype=torch.int64,
                device="cpu", used_experts=None):  # fmt: skip
    """Random inputs; ``used_experts`` limits routing to a subset so the other experts get nothing."""
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=device) / inter**0.5).to(dtype)
    pool = torch.tensor(used_experts) if used_experts is not None else torch.arange(num_experts)
    # Distinct experts per token, as a router would pick.
    ids = pool[torch.rand(num_tokens, len(pool)).argsort(-1)[:, :top_k]].to(device=device, dtype=ids_dtype)
    weights = torch.rand(num_tokens, top_k, device=device)
    return x, w13, w2, weights, ids


def naive_moe(x, w13, w2, weights, ids):
    """The definition, one (token, slot) at a time."""
    inter = w13.shape[1] // 2
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros_like(x[t], dtype=torch.promote_types(x.dtype, torch.float32))
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            act = F.silu(w13[e, :inter] @ x[t]) * (w13[e, inter:] @ x[t])
            row = row + weights[t, k] * (w2[e] @ act)
        rows.append(row)
    return torch.stack(rows).to(x.dtype) if rows else x.new_zeros(x.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_ref_matches_naive_loop(shape, ids_dtype):
    inputs = make_inputs(*shape, ids_dtype=ids_dtype)
    torch.testing.assert_close(fused_moe_ref(*inputs), naive_moe(*inputs), rtol=1e-5, atol=1e-5)


def test_ref_gradients_match_naive_loop():
    inputs = [t.double() if t.is_floating_point() else t for t in make_inputs(9, 12, 6, 5, 3, used_experts=[0, 2, 3])]
    for t in inputs[:4]:
        t.requires_grad_(True)
    grad_out = torch.randn(9, 12, dtype=torch.float64)
    ours = torch.autograd.grad((fused_moe_ref(*inputs) * grad_out).sum(), inputs[:4])
    theirs = torch.autograd.grad((naive_moe(*inputs) * grad_out).sum(), inputs[:4])
    for name, a, b in zip(["hidden_states", "w13", "w2", "topk_weights"], ours, theirs):
        torch.testing.assert_close(a, b, msg=f"grad of {name}")


def test_ref_layout_matches_transformers_gate_up_proj():
    config = DeepseekV3Config(hidden_size=16, moe_intermediate_size=8, n_routed_experts=6, hidden_act="silu")
    experts = DeepseekV3Experts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    x, _, _, weights, ids = make_inputs(7, 16, 8, 6, 2)
    with torch.no_grad():
        expected = experts(x, ids, weights)
        actual = fused_moe_ref(x, experts.gate_up_proj, experts.down_proj, weights, ids)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_ref_rejects_out_of_range_expert_ids():
    x, w13, w2, weights, ids = make_inputs(3, 8, 4, 4, 2)
    with pytest.raises(ValueError, match="num_experts"):
        fused_moe_ref(x, w13, w2, weights, ids + 4)


def test_ref_rejects_mismatched_shapes():
    x, w13, w2, weights, ids = make_inputs(3, 8, 4, 4, 2)
    with pytest.raises(ValueError, match="w2"):
        fused_moe_ref(x, w13, w2[:, :, :3], weights, ids)


@pytest.mark.parametrize(
    "num_tokens,top_k,num_experts,block_size", [(0, 2, 4, 4), (1, 1, 7, 4), (17, 3, 7, 4), (9, 2, 64, 16)]
)
def test_align_groups_pairs_by_expert_in_padded_blocks(num_tokens, top_k, num_experts, block_size):
    ids = torch.randint(0, num_experts, (num_tokens, top_k), dtype=torch.int32)
    sorted_ids, block_experts, num_padded = moe_align_block_size(ids, block_size, num_experts)
    num_pairs = num_tokens * top_k
    used = int(num_padded)
    assert sorted_ids.numel() == block_experts.numel() * block_size and used % block_size == 0
    real = sorted_ids[sorted_ids < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    assert (sorted_ids[used:] == num_pairs).all() and (block_experts[used // block_size :] == -1).all()
    counts = torch.bincount(ids.flatten().long(), minlength=num_experts)
    assert used == int(((counts + block_size - 1) // block_size * block_size).sum())
    for block, expert in enumerate(block_experts[: used // block_size].tolist()):
        pairs = sorted_ids[block * block_size : (block + 1) * block_size]
        pairs = pairs[pairs < num_pairs].long()
        assert len(pairs) > 0 and (ids.flatten()[pairs] == expert).all()


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_size", [
    (1, 6, 64, 16), (1, 1, 1, 16), (3, 2, 8, 16), (5, 4, 7, 4), (16, 8, 256, 16), (32, 4, 16, 64), (64, 2, 8, 16),
])
def test_one_launch_align_equals_the_reference(needs_triton, num_tokens, top_k, num_experts, block_size):
    """The single-program Triton alignment (small decode steps) gives the reference's tensors exactly:
    same sizes, same padding, the same stable order of pairs within each expert."""
    from expertmesh.kernels.triton.moe_align import moe_align_block_size_triton

    pool = torch.arange(num_experts)
    ids = pool[torch.rand(num_tokens, num_experts).argsort(-1)[:, :top_k]].to(device=DEVICE, dtype=torch.int32)
    want = moe_align_block_size(ids, block_size, num_experts)
    got = moe_align_block_size_triton(ids, block_size, num_experts)
    for w, g in zip(want, got):
        assert torch.equal(w.int().cpu(), g.cpu())


def test_one_launch_align_refuses_what_it_does_not_fit(needs_triton):
    from expertmesh.kernels.triton.moe_align import moe_align_block_size_triton

    with pytest.raises(ValueError, match="1..128 pairs and 1..256 experts, got 129 and 8"):
        moe_align_block_size_triton(torch.zeros(129, 1, dtype=torch.int32, device=DEVICE), 16, 8)


TRITON_CASES = [
    (torch.float32, torch.int64, 1e-5),
    (torch.float32, torch.int32, 1e-5),
    (torch.bfloat16, torch.int64, 3e-2),
    (torch.float16, torch.int32, 5e-3),
]


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,ids_dtype,tol", TRITON_CASES)
def test_triton_matches_ref(shape, dtype, ids_dtype, tol):
    inputs = make_inputs(*shape, dtype=dtype, ids_dtype=ids_dtype, device=DEVICE)
    expected = fused_moe_ref(*inputs)
    actual = fused_moe_triton(*inputs)
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.usefixtures("needs_triton")
def test_triton_skips_experts_without_tokens_among_256():
    inputs = make_inputs(6, 16, 8, 256, 3, device=DEVICE, used_experts=[0, 1, 100, 254, 255])
    torch.testing.assert_close(fused_moe_triton(*inputs), fused_moe_ref(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("needs_triton")
def test_triton_uses_64_row_blocks_for_many_tokens():
    inputs = make_inputs(70, 16, 8, 2, 2, device=DEVICE)  # 140 pairs on 2 experts -> BLOCK_M = 64
    torch.testing.assert_close(fused_moe_triton(*inputs), fused_moe_ref(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("needs_triton")
def test_triton_reads_strided_weight_views():
    x, w13, w2, weights, ids = make_inputs(5, 16, 8, 4, 2, device=DEVICE)
    w13_view = torch.cat([w13, torch.randn_like(w13)], dim=-1)[..., :16]  # row stride 32
    w2_view = torch.cat([w2, torch.randn_like(w2)], dim=0)[::2]  # expert stride doubled
    w2_view.copy_(w2)
    expected = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_moe_triton(x, w13_view, w2_view, weights, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("needs_triton")
def test_triton_rejects_unsupported_dtype():
    inputs = [t.double() if t.is_floating_point() else t for t in make_inputs(2, 16, 8, 4, 2, device=DEVICE)]
    with pytest.raises(ValueError, match="float64"):
        fused_moe_triton(*inputs)
