"""Linear layers on the CPU at decode sizes: the C++ kernels of `cpu_ext`, else oneDNN instead of MKL's sgemm.

At decode batch sizes (M = 1..32 rows) MKL's small-M sgemm streams cold weights at ~10 GB/s on our
2-core reference machine while oneDNN's `_linear_pointwise` reaches ~18 GB/s (PERF-NOTES.md, and
bench/engine_vs_hf.py). oneDNN has no autograd formula, so anything that records gradients, and every
non-CPU tensor, takes `F.linear`.

The compiled kernel (`linear_small_m`) goes faster still, up to 64 rows in float32 (8 in bf16): below 16 rows
it streams the weights at the memory's rate; from 16 rows the arithmetic bounds a call, and it puts the tokens in
a register's lanes (csrc/tokens_in_lanes.h): 1.2-1.4x oneDNN and MKL at 32 and 48 rows, level at 64. Where it
cannot be built, oneDNN serves up to 32 rows. oneDNN builds (and caches, up to 1024 entries) one primitive per
input shape, which costs milliseconds the first time, and ~13 us more per call than `F.linear`, so weights
that stream in a few microseconds anyway (under ~1 MB) stay on `F.linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .backend import kernel_backend
from .cpu_ext import small_m_kernels

ONEDNN_MAX_ROWS = 32
# Up to this many rows the C++ kernel (csrc/small_m.cpp) beats oneDNN and MKL on the Intel reference machine: by
# 10-70% at 2-8 rows, 20-40% at 32 and 48 (tokens in lanes), level at 64. In bf16 it is 1.2-1.8x oneDNN's AMX
# GEMM up to 8 rows, level at 12, and AMX wins from 16 (1.5-2.8x at 32).
STREAMING_MAX_ROWS = 64
STREAMING_MAX_ROWS_BF16 = 8
STREAMING_MIN_WEIGHT_ELEMENTS = 64 * 1024
ONEDNN_MIN_WEIGHT_ELEMENTS = 256 * 1024


@functools.cache
def onednn_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(1, 8), torch.ones(4, 8)
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.equal(out, F.linear(x, w)))


def _cpu_inference(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """CPU inference on 2-D `x` with `x` and `weight` both `dtype`, under the `auto` backend."""
    return (
        x.is_cpu
        and x.dtype == weight.dtype == dtype
        and x.dim() == 2
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and kernel_backend() == "auto"
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` semantics: x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N]. In bfloat16 at decode sizes the
    streaming kernel reads the bf16 weights and sums in float32, rounding the output once (as oneDNN's bf16
    GEMM does)."""
    if _cpu_inference(x, weight, torch.bfloat16) and x.shape[0] <= STREAMING_MAX_ROWS_BF16 and weight.is_contiguous():
        kernels = small_m_kernels()
        if kernels is not None:
            return kernels.linear_small_m_bf16(x.contiguous(), weight, bias)
    if _cpu_inference(x, weight, torch.float32):
        rows, size = x.shape[0], weight.numel()
        if rows <= STREAMING_MAX_ROWS and size >= STREAMING_MIN_WEIGHT_ELEMENTS and weight.is_contiguous():
            kernels = small_m_kernels()
            if kernels is not None:
                return kernels.linear_small_m(x.contiguous(), weight, bias)
        if rows <= ONEDNN_MAX_ROWS and size >= ONEDNN_MIN_WEIGHT_ELEMENTS and onednn_available():
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
