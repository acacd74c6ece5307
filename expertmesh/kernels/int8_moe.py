"""Int8 routed experts: symmetric quantisation with one float32 scale per output row of each expert
(w[e, n, :] ~ q[e, n, :] * scale[e, n], q in [-127, 127]), activations and accumulation in float32.

`quantize_int8` makes them from float weights; `fused_moe_int8_ref` is the reference (dequantise the experts
that received tokens, then `fused_moe_ref`); `fused_moe_int8_cpu` is the serving path on the CPU: at decode
sizes the C++ kernel of `csrc/small_m.cpp` streams the int8 rows and widens them in registers (a quarter of
float32's bytes), at prefill sizes each expert that received tokens is dequantised and runs as two linears.

With `quantize_activations` (w8a8) the kernel also quantises each activation row in blocks of 32, as llama.cpp's
Q8_0 does (`quantize_activations_q8`), and sums integer products (`csrc/q8_rows.h`), at every batch size.
"""

from __future__ import annotations

import torch

from .cpu_ext import small_m_kernels
from .cpu_fused_moe import SMALL_M_MAX_PAIRS, fused_moe_cpu
from .fused_moe import check_fused_moe_args, fused_moe_ref

QMAX = 127  # symmetric: -128 is never used, so negating a weight never overflows


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., N, K], scale float32 [..., N]) with w ~ q * scale[..., None], rounding to nearest; a row
    of zeros gets scale 1."""
    w = w.detach().float()
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


Q8_BLOCK = 32  # activations per scale when they are quantised too


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K a multiple of 32) as int8 activations stand for it, in float32: each block of 32 as
    q * d with d = amax / 127 and q = round(x / d), ties to even (zero blocks stay zero)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, Q8_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / QMAX
    q = torch.where(d > 0, torch.round(blocks / d), torch.zeros_like(blocks))
    return (q * d).reshape(x.shape)


def check_activation_quantizable(size: int, what: str) -> None:
    if size % Q8_BLOCK:
        raise ValueError(f"quantised activations need {what} to be a multiple of {Q8_BLOCK}, got {size}")


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


def check_int8_args(hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids,
                    quantize_activations: bool = False) -> None:
    """ValueError naming the argument that does not fit (shapes as `check_fused_moe_args`, int8 weights,
    float32 scales of one per output row; sizes that quantise in blocks of 32)."""
    if quantize_activations:
        check_activation_quantizable(w13.shape[2], "the hidden size")
        check_activation_quantizable(w2.shape[2], "the expert intermediate size")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dtype != torch.int8:
            raise ValueError(f"{name} must be int8, got {t.dtype}")
    for name, t, w in (("w13_scale", w13_scale, w13), ("w2_scale", w2_scale, w2)):
        if t.dtype != torch.float32 or tuple(t.shape) != tuple(w.shape[:2]):
            raise ValueError(f"{name} must be float32 {tuple(w.shape[:2])}, got {t.dtype} {tuple(t.shape)}")
    like = lambda w: _Like(w.shape, hidden_states.dtype)  # noqa: E731 - shapes only
    check_fused_moe_args(hidden_states, like(w13), like(w2), topk_weights, topk_ids)


class _Like:
    """A weight's shape in the activations' dtype: what `check_fused_moe_args` reads of a float weight (a meta
    tensor would do, at ~10 us a call, twice per MoE layer per step)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: torch.Size, dtype: torch.dtype):
        self.shape, self.dtype = shape, dtype

    def dim(self) -> int:
        return len(self.shape)


def dequantize_used(w13, w13_scale, w2, w2_scale, topk_ids, dtype: torch.dtype):
    """(w13 [U, 2I, H], w2 [U, H, I] of only the experts that received tokens, dequantised to `dtype`; topk_ids
    renumbered into them [T, K]): what a float fused-MoE path runs on."""
    used, inverse = torch.unique(topk_ids, return_inverse=True)
    return (dequantize_int8(w13[used], w13_scale[used], dtype), dequantize_int8(w2[used], w2_scale[used], dtype),
            inverse.view_as(topk_ids))


def fused_moe_int8_ref(hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids,
                       quantize_activations: bool = False) -> torch.Tensor:
    """Routed output [T, H] in hidden_states.dtype: `fused_moe_ref` over the dequantised experts; with
    `quantize_activations`, each expert's input and its down projection's input as int8 activations stand for
    them (float32 math throughout)."""
    check_int8_args(hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, quantize_activations)
    if quantize_activations:
        return _w8a8_ref(hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids)
    w13_f, w2_f, ids = dequantize_used(w13, w13_scale, w2, w2_scale, topk_ids, hidden_states.dtype)
    return fused_moe_ref(hidden_states, w13_f, w2_f, topk_weights, ids)


def _w8a8_ref(hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids) -> torch.Tensor:
    """Expert by expert over the tokens routed to it: each expert's weights dequantised once."""
    x = quantize_activations_q8(hidden_states)
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in topk_ids.unique().tolist():
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        gate_up = x[tokens] @ dequantize_int8(w13[e], w13_scale[e]).T
        act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = quantize_activations_q8(act) @ dequantize_int8(w2[e], w2_scale[e]).T
        out.index_add_(0, tokens, topk_weights[tokens, slots].float()[:, None] * down)
    return out.to(hidden_states.dtype)


@torch.no_grad()
def fused_moe_int8_cpu(hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids,
                       quantize_activations: bool = False) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0 or top_k == 0:
        return hidden_states.new_zeros(num_tokens, hidden_states.shape[1])
    # quantised activations run the kernel at every size: the dequantised path below has no place to quantise
    # the down projection's input
    if hidden_states.dtype in (torch.float32, torch.bfloat16) and (
            quantize_activations or num_tokens * top_k <= SMALL_M_MAX_PAIRS):
        kernels = small_m_kernels()
        if kernels is not None and w13.is_contiguous() and w2.is_contiguous():
            out = kernels.moe_small_m_int8(hidden_states.float().contiguous(), w13, w13_scale.contiguous(), w2,
                                           w2_scale.contiguous(), topk_weights, topk_ids, quantize_activations)
            return out.to(hidden_states.dtype)  # bf16: float32 sums, rounded once
    if quantize_activations:  # the arguments were checked by the caller, as for the paths above
        return _w8a8_ref(hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids)
    w13_f, w2_f, ids = dequantize_used(w13, w13_scale, w2, w2_scale, topk_ids, hidden_states.dtype)
    return fused_moe_cpu(hidden_states, w13_f, w2_f, topk_weights, ids)
