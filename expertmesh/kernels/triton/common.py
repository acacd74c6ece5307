"""Helpers shared by the Triton kernels."""

import torch
import triton
import triton.language as tl


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is dense (what the kernels index without a stride),
    else a contiguous copy. Other strides are passed to the kernels, so views of caches and
    stacked weights are read in place."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dot_options(dtype: torch.dtype) -> dict:
    """Launch constexprs for ``dot``: IEEE fp32 (no TF32) for fp32 inputs, and an fp32 upcast of
    bf16 operands under ``TRITON_INTERPRET=1``, whose ``tl.dot`` multiplies bf16 as raw uint16
    (triton 3.9). On a GPU the upcast is off and bf16 goes to the tensor cores."""
    return {
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else None,
        "DOT_UPCAST": bool(triton.knobs.runtime.interpret) and dtype == torch.bfloat16,
    }


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
