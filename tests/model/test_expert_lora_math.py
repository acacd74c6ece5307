"""`expert_lora_forward` against a naive reference that takes one (token, expert) pair at a time with plain
loops: outputs and the gradients of x, the routing weights and every adapter tensor, on pairs that include
-1 ids (another shard's), experts with no adapter slot, experts no token reaches and a token with no pair
at all; the base weights' gradients when they require one; and bfloat16 inputs against the float32
reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expertmesh.model.lora import expert_lora_forward

T, H, I, E, K, R = 13, 24, 10, 7, 3, 4
SCALING = 1.5
SLOT = [2, -1, 0, -1, 1, 3, -1]  # experts 1, 3 and 6 have no adapter; slot 3 (expert 5) gets no token


def naive(x, topk_weights, topk_ids, w13, w2, slot, adapters, scaling):
    a13, b13, a2, b2 = adapters
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    rows = []
    for t in range(topk_ids.shape[0]):
        row = out[t]
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            s = int(slot[e])
            gate_up = w13[e] @ x[t]
            if s >= 0:
                gate_up = gate_up + scaling * (b13[s] @ (a13[s] @ x[t]))
            act = F.silu(gate_up[:I]) * gate_up[I:]
            y = w2[e] @ act
            if s >= 0:
                y = y + scaling * (b2[s] @ (a2[s] @ act))
            row = row + topk_weights[t, k].float() * y.float()
        rows.append(row)
    return torch.stack(rows).to(x.dtype)


def make_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=1.0: torch.randn(*shape, generator=gen) * std  # noqa: E731
    x = rand(T, H)
    reached = torch.tensor([0, 1, 2, 3, 4, 6])  # expert 5 (slot 3) gets no pair: its adapter's gradient is zero
    topk_ids = torch.stack([reached[torch.randperm(len(reached), generator=gen)[:K]] for _ in range(T)])
    topk_ids[0, 1] = -1
    topk_ids[4, :] = -1  # a token with no pair here: output and gradients zero
    topk_ids[7, 2] = -1
    topk_weights = torch.rand(T, K, generator=gen)
    w13, w2 = rand(E, 2 * I, H, std=0.3), rand(E, H, I, std=0.3)
    slots = 4
    adapters = (rand(slots, R, H, std=0.3), rand(slots, 2 * I, R, std=0.3), rand(slots, R, I, std=0.3),
                rand(slots, H, R, std=0.3))
    return x, topk_weights, topk_ids, w13, w2, torch.tensor(SLOT), adapters


def leaves(x, topk_weights, adapters):
    return [t.clone().requires_grad_(True) for t in (x, topk_weights, *adapters)]


def test_output_and_every_gradient_equal_the_per_pair_reference_in_float32():
    x, topk_weights, topk_ids, w13, w2, slot, adapters = make_inputs()
    ours = leaves(x, topk_weights, adapters)
    ref = leaves(x, topk_weights, adapters)
    got = expert_lora_forward(ours[0], ours[1], topk_ids, w13, w2, slot, tuple(ours[2:]), SCALING)
    want = naive(ref[0], ref[1], topk_ids, w13, w2, slot, tuple(ref[2:]), SCALING)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[4].abs().max() == 0  # the token whose pairs are all elsewhere

    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    got.backward(grad_out)
    want.backward(grad_out)
    names = ("x", "topk_weights", "w13 A", "w13 B", "w2 A", "w2 B")
    for name, a, b in zip(names, ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert ours[1].grad[0, 1] == 0 and ours[1].grad[4].abs().max() == 0  # -1 pairs get no weight gradient
    for adapter in ours[2:]:
        assert adapter.grad[3].abs().max() == 0  # expert 5's slot: no token
        assert all(adapter.grad[s].abs().max() > 0 for s in range(3))  # and every reached slot has one


def test_base_weight_gradients_equal_the_reference_when_asked_for():
    x, topk_weights, topk_ids, w13, w2, slot, adapters = make_inputs(seed=2)
    grads = []
    for fn in (expert_lora_forward, naive):
        bases = [w13.clone().requires_grad_(True), w2.clone().requires_grad_(True)]
        fn(x, topk_weights, topk_ids, *bases, slot, adapters, SCALING).sum().backward()
        grads.append([b.grad for b in bases])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_pair_here_gives_zeros_and_zero_gradients():
    x, topk_weights, _, w13, w2, slot, adapters = make_inputs()
    ours = leaves(x, topk_weights, adapters)
    out = expert_lora_forward(ours[0], ours[1], torch.full((T, K), -1), w13, w2, slot, tuple(ours[2:]), SCALING)
    assert out.abs().max() == 0
    out.sum().backward()
    assert all(t.grad.abs().max() == 0 for t in ours)


def test_zero_size_adapters_when_no_expert_has_a_slot():
    """The training shards pass empty stand-ins for a layer none of whose experts here has an adapter."""
    x, topk_weights, topk_ids, w13, w2, _, _ = make_inputs()
    empty = torch.empty(0)
    slot = torch.full((E,), -1)
    got = expert_lora_forward(x, topk_weights, topk_ids, w13, w2, slot, (empty,) * 4, SCALING)
    torch.testing.assert_close(got, naive(x, topk_weights, topk_ids, w13, w2, slot, (empty,) * 4, SCALING),
                               rtol=1e-5, atol=1e-5)


def test_an_expert_id_beyond_the_stacks_is_refused():
    x, topk_weights, topk_ids, w13, w2, slot, adapters = make_inputs()
    topk_ids[2, 0] = E
    with pytest.raises(ValueError, match="expert ids up to 7"):
        expert_lora_forward(x, topk_weights, topk_ids, w13, w2, slot, adapters, SCALING)


def test_bfloat16_forward_is_within_bfloat16_rounding_of_the_float32_reference():
    x, topk_weights, topk_ids, w13, w2, slot, adapters = make_inputs(seed=3)
    bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
    got = expert_lora_forward(bf16(x), topk_weights, topk_ids, bf16(w13), bf16(w2), slot,
                              tuple(map(bf16, adapters)), SCALING)
    assert got.dtype == torch.bfloat16
    up = lambda t: bf16(t).float()  # noqa: E731 the same bf16-rounded inputs, computed in float32
    want = naive(up(x), topk_weights, topk_ids, up(w13), up(w2), slot, tuple(map(up, adapters)), SCALING)
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 3.9e-3); each pair's two matmuls round their
    # inputs and outputs in bf16, so allow a few steps of the output's scale.
    scale = want.abs().max()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * scale)
