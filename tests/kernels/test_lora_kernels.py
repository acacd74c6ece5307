"""Multi-adapter LoRA kernels (kernels/lora.py): the references against the definition one row at a time, the
CPU paths (C++ for float32, the references otherwise) and the Triton kernels (under TRITON_INTERPRET=1 without
a GPU) against the references; rows without an adapter are never written.

Tolerances: float32 paths agree with the references to 1e-5; bf16 inputs to 3e-2 (bf16 keeps 8 bits of
mantissa: the paths round the expert activations and outputs at different points)."""

import pytest
import torch
import torch.nn.functional as F

from expertmesh.kernels import (expert_lora_rows, fused_moe, fused_moe_lora, fused_moe_lora_ref, fused_moe_ref,
                                lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref)
from expertmesh.kernels.cpu_fused_moe import SMALL_M_MAX_PAIRS
from expertmesh.kernels.cpu_lora import fused_moe_lora_cpu, lora_expand_cpu, lora_shrink_cpu

from .conftest import DEVICE
from .test_fused_moe import make_inputs

BF16_TOL = 3e-2
SENTINEL = 12345.0  # what rows of y without an adapter hold before and after an expand


def held_transposed(b: torch.Tensor) -> torch.Tensor:
    """b [N, out, r] as the model stores it: [N, r, out] in memory, a transposed view."""
    return b.transpose(1, 2).contiguous().transpose(1, 2)


def make_linear(num_rows=9, fin=40, fout=24, rank=4, slots=3, dtype=torch.float32, device="cpu", rows=None):
    """x [T, in], A [S, r, in], B [S, out, r], rows [T] with some -1."""
    x = torch.randn(num_rows, fin, device=device).to(dtype)
    a = (torch.randn(slots, rank, fin, device=device) / fin**0.5).to(dtype)
    b = (torch.randn(slots, fout, rank, device=device) / rank**0.5).to(dtype)
    if rows is None:
        rows = torch.randint(-1, slots, (num_rows,), device=device)
        rows[0] = -1
    return x, a, b, rows


def naive_shrink(x, a, rows):
    return torch.stack([a[r].double() @ x[t].double() if r >= 0 else x.new_zeros(a.shape[1], dtype=torch.float64)
                        for t, r in enumerate(rows.tolist())])


def naive_expand(y, h, b, rows):
    y = y.double().clone()
    for t, r in enumerate(rows.tolist()):
        if r >= 0:
            y[t] += b[r].double() @ h[t].double()
    return y


def make_moe_lora(num_tokens=9, hidden=40, inter=24, num_experts=7, top_k=3, slots=3, rank=4, dtype=torch.float32,
                  device="cpu"):  # fmt: skip
    """fused_moe's inputs plus each pair's stack row (from an index [S, E] adapting a few experts per slot and
    token slots with some -1) and the stacks A13, B13 (held transposed), A2, B2."""
    x, w13, w2, weights, ids = make_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype=dtype, device=device)
    index = torch.full((slots, num_experts), -1, dtype=torch.int64, device=device)
    n = 0
    for s in range(slots):
        chosen = torch.randperm(num_experts)[: 1 + s % 3 * 2]  # 1, 3, 5 experts
        index[s, chosen.to(device)] = torch.arange(n, n + len(chosen), device=device)
        n += len(chosen)
    token_slots = torch.randint(-1, slots, (num_tokens,), device=device)
    rows = expert_lora_rows(index, token_slots, ids)
    stack = lambda *shape, fan_in: (torch.randn(n, *shape, device=device) / fan_in**0.5).to(dtype)  # noqa: E731
    a13, b13 = stack(rank, hidden, fan_in=hidden), held_transposed(stack(2 * inter, rank, fan_in=rank))
    a2, b2 = stack(rank, inter, fan_in=inter), held_transposed(stack(hidden, rank, fan_in=rank))
    return x, w13, w2, weights, ids, rows, a13, b13, a2, b2


def naive_moe_lora(x, w13, w2, weights, ids, rows, a13, b13, a2, b2):
    """The definition, one (token, expert) pair at a time, in float64."""
    x, w13, w2, a13, b13, a2, b2 = (t.double() for t in (x, w13, w2, a13, b13, a2, b2))
    inter = w2.shape[2]
    out = []
    for t in range(x.shape[0]):
        row = torch.zeros_like(x[t])
        for k in range(ids.shape[1]):
            e, r = int(ids[t, k]), int(rows[t, k])
            gate_up = w13[e] @ x[t]
            if r >= 0:
                gate_up = gate_up + b13[r] @ (a13[r] @ x[t])
            act = F.silu(gate_up[:inter]) * gate_up[inter:]
            y = w2[e] @ act
            if r >= 0:
                y = y + b2[r] @ (a2[r] @ act)
            row = row + weights[t, k].double() * y
        out.append(row)
    return torch.stack(out) if out else torch.zeros_like(x)


# -- the references ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64])
def test_shrink_ref_matches_a_loop_over_rows(rows_dtype):
    x, a, _, rows = make_linear()
    h = lora_shrink_ref(x, a, rows.to(rows_dtype))
    assert h.dtype == torch.float32 and h.shape == (9, 4)
    torch.testing.assert_close(h.double(), naive_shrink(x, a, rows), rtol=1e-5, atol=1e-5)
    assert not h[rows < 0].any()


def test_expand_ref_adds_in_place_and_leaves_rows_without_an_adapter_untouched():
    x, a, b, rows = make_linear()
    y = torch.randn(9, 24)
    y[rows < 0] = SENTINEL
    h = lora_shrink_ref(x, a, rows)
    want = naive_expand(y, h, b, rows)
    out = lora_expand_ref(y, h, b, rows)
    assert out is y
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert (y[rows < 0] == SENTINEL).all()


def test_expert_lora_rows_reads_the_index_and_drops_tokens_without_a_slot():
    index = torch.tensor([[-1, 0, -1, 1], [2, -1, -1, 3]])
    ids = torch.tensor([[1, 3], [0, 1], [2, 3]])
    rows = expert_lora_rows(index, torch.tensor([0, 1, -1]), ids)
    assert rows.tolist() == [[0, 1], [2, -1], [-1, -1]]


@pytest.mark.parametrize("num_tokens", [0, 1, 9])
def test_fused_moe_lora_ref_matches_the_pairwise_definition(num_tokens):
    inputs = make_moe_lora(num_tokens=num_tokens)
    assert num_tokens < 9 or (inputs[5] >= 0).any() and (inputs[5] < 0).any()
    torch.testing.assert_close(fused_moe_lora_ref(*inputs).double(), naive_moe_lora(*inputs), rtol=1e-5, atol=1e-5)


def test_fused_moe_lora_ref_without_adapted_pairs_is_fused_moe():
    x, w13, w2, weights, ids, rows, a13, b13, a2, b2 = make_moe_lora()
    none = torch.full_like(rows, -1)
    torch.testing.assert_close(fused_moe_lora_ref(x, w13, w2, weights, ids, none, a13, b13, a2, b2),
                               fused_moe_ref(x, w13, w2, weights, ids), rtol=1e-6, atol=1e-6)


def test_fused_moe_lora_ref_gradients_match_the_pairwise_definition():
    inputs = [t.double() if t.is_floating_point() else t for t in make_moe_lora(num_tokens=5, hidden=12, inter=6,
                                                                                num_experts=5, top_k=2)]
    floats = [i for i, t in enumerate(inputs) if t.is_floating_point()]
    for i in floats:
        inputs[i].requires_grad_(True)
    grad_out = torch.randn(5, 12, dtype=torch.float64)
    ours = torch.autograd.grad((fused_moe_lora_ref(*inputs) * grad_out).sum(), [inputs[i] for i in floats])
    theirs = torch.autograd.grad((naive_moe_lora(*inputs) * grad_out).sum(), [inputs[i] for i in floats])
    for i, a, b in zip(floats, ours, theirs):
        torch.testing.assert_close(a, b, msg=f"gradient of input {i}")


def test_bad_shapes_are_refused_by_name():
    x, a, b, rows = make_linear()
    with pytest.raises(ValueError, match=r"a must be \[N, r, in=40\]"):
        lora_shrink_ref(x, a.transpose(1, 2), rows)
    with pytest.raises(ValueError, match=r"rows must be int32/int64 \[T=9\]"):
        lora_shrink_ref(x, a, rows[:3])
    with pytest.raises(ValueError, match=r"h must be \[T=9, r=4\]"):
        lora_expand_ref(torch.zeros(9, 24), torch.zeros(9, 5), b, rows)
    inputs = list(make_moe_lora())
    inputs[9] = inputs[9][:, :5]  # B2 [N, H, r] with the wrong H
    with pytest.raises(ValueError, match=r"b2 must have shape"):
        fused_moe_lora_ref(*inputs)


# -- the CPU paths -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["held transposed", "contiguous"])
def test_cpu_shrink_and_expand_match_the_references(layout):
    x, a, b, rows = make_linear(num_rows=33, fin=100, fout=70, rank=8, slots=5)
    b = held_transposed(b) if layout == "held transposed" else b
    y = torch.randn(33, 70)
    y[rows < 0] = SENTINEL
    h = lora_shrink_cpu(x, a, rows)
    torch.testing.assert_close(h, lora_shrink_ref(x, a, rows), rtol=1e-5, atol=1e-5)
    want = lora_expand_ref(y.clone(), h, b, rows)
    lora_expand_cpu(y, h, b, rows)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert (y[rows < 0] == SENTINEL).all()


def test_cpu_shrink_and_expand_in_bf16():
    x, a, b, rows = make_linear(dtype=torch.bfloat16)
    y = torch.randn(9, 24).bfloat16()
    h = lora_shrink_cpu(x, a, rows)
    torch.testing.assert_close(h, naive_shrink(x, a, rows).float(), rtol=BF16_TOL, atol=BF16_TOL)
    want = naive_expand(y, h, b, rows)
    torch.testing.assert_close(lora_expand_cpu(y, h, b, rows).double(), want, rtol=BF16_TOL, atol=BF16_TOL)


@pytest.mark.parametrize("num_tokens", [1, 9, SMALL_M_MAX_PAIRS // 3 + 1])  # the C++ kernel, then the torch path
def test_cpu_fused_moe_lora_matches_the_reference(num_tokens):
    inputs = make_moe_lora(num_tokens=num_tokens)
    torch.testing.assert_close(fused_moe_lora_cpu(*inputs), fused_moe_lora_ref(*inputs), rtol=1e-5, atol=1e-5)


def test_cpu_fused_moe_lora_in_bf16():
    inputs = make_moe_lora(dtype=torch.bfloat16)
    out = fused_moe_lora_cpu(*inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), naive_moe_lora(*inputs), rtol=BF16_TOL, atol=BF16_TOL)


def test_dispatch_takes_the_cpu_paths_for_inference_and_the_references_under_autograd(monkeypatch):
    import expertmesh.kernels.registry as registry

    calls = []
    for name in ("lora_shrink_cpu", "lora_expand_cpu", "fused_moe_lora_cpu"):
        fn = getattr(registry, name)
        monkeypatch.setattr(registry, name, lambda *args, fn=fn, name=name: calls.append(name) or fn(*args))
    x, a, b, rows = make_linear()
    with torch.no_grad():
        y = lora_expand(torch.zeros(9, 24), lora_shrink(x, a, rows), b, rows)
        fused_moe_lora(*make_moe_lora())
    assert calls == ["lora_shrink_cpu", "lora_expand_cpu", "fused_moe_lora_cpu"]
    want = naive_expand(torch.zeros(9, 24), naive_shrink(x, a, rows), b, rows)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)

    a.requires_grad_(True)
    lora_expand(torch.zeros(9, 24), lora_shrink(x, a, rows), b, rows).sum().backward()
    assert len(calls) == 3 and a.grad[rows[rows >= 0]].abs().sum() > 0


def test_fused_moe_lora_without_adapted_pairs_equals_fused_moe_on_the_cpu_path():
    inputs = make_moe_lora()
    no_rows = torch.full_like(inputs[5], -1)
    with torch.no_grad():
        torch.testing.assert_close(fused_moe_lora(*inputs[:5], no_rows, *inputs[6:]), fused_moe(*inputs[:5]),
                                   rtol=1e-5, atol=1e-5)


# -- Triton (the interpreter without a GPU: small shapes) -----------------------------------------------------------
TRITON_DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)]


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("dtype,tol", TRITON_DTYPES)
def test_triton_shrink_and_expand_match_the_references(dtype, tol):
    from expertmesh.kernels import lora_expand_triton, lora_shrink_triton

    x, a, b, rows = make_linear(num_rows=6, fin=20, fout=70, rank=3, dtype=dtype, device=DEVICE)
    b = held_transposed(b)
    y = torch.randn(6, 70, device=DEVICE).to(dtype)
    y[rows < 0] = SENTINEL
    h = lora_shrink_triton(x, a, rows)
    torch.testing.assert_close(h, lora_shrink_ref(x, a, rows), rtol=tol, atol=tol)
    want = lora_expand_ref(y.clone(), h, b, rows)
    assert lora_expand_triton(y, h, b, rows) is y
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    assert (y[rows < 0] == SENTINEL).all()


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("dtype,tol", TRITON_DTYPES)
def test_triton_fused_moe_lora_matches_the_reference(dtype, tol):
    from expertmesh.kernels import fused_moe_lora_triton

    inputs = make_moe_lora(num_tokens=5, hidden=16, inter=8, num_experts=4, top_k=2, dtype=dtype, device=DEVICE)
    actual = fused_moe_lora_triton(*inputs)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, fused_moe_lora_ref(*inputs), rtol=tol, atol=tol)
