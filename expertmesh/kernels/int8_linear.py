"""Int8 weight-only linear layers: w [N, K] ~ q [N, K] int8 * scale [N] (one float32 scale per output row, as
`quantize_int8` makes them); activations and accumulation stay in float32.

`linear_int8_ref` dequantises and runs `F.linear`. `linear_int8` is the serving path: on the CPU, for up to
`KERNEL_MAX_ROWS` rows, the C++ kernel of `csrc/small_m.cpp` streams the int8 rows once and widens them in
registers (a quarter of float32's bytes: at decode sizes a linear is a pass over its weights). Past that the
call is compute-bound and dequantising once, then one BLAS GEMM, is faster.

With `quantize_activations` (w8a8), the kernel quantises x in blocks of 32 as llama.cpp's Q8_0 does
(`quantize_activations_q8`) and sums integer products; past `KERNEL_MAX_ROWS` rows the reference runs on
the same quantised activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import kernel_backend
from .cpu_ext import small_m_kernels
from .int8_moe import check_activation_quantizable, dequantize_int8, quantize_activations_q8

# Measured on the 2-core reference machine (32000 x 768 weights): the kernel costs ~0.19 ms per row, dequantising
# ~40 ms once plus the GEMM; they cross near 200 rows.
KERNEL_MAX_ROWS = 128


def check_int8_linear_args(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                           quantize_activations: bool = False) -> None:
    """ValueError naming the argument that does not fit."""
    if quantize_activations:
        check_activation_quantizable(q.shape[-1], "the input size K")
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"weight must be a 2-D int8 tensor [N, K], got {q.dtype} {tuple(q.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (q.shape[0],):
        raise ValueError(f"scale must be float32 ({q.shape[0]},), got {scale.dtype} {tuple(scale.shape)}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal the weight's K ({q.shape[1]})")
    if bias is not None and tuple(bias.shape) != (q.shape[0],):
        raise ValueError(f"bias must be ({q.shape[0]},), got {tuple(bias.shape)}")


def linear_int8_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    quantize_activations: bool = False):
    """x [..., K] @ (q * scale)^T (+ bias) -> [..., N] in x.dtype, computed in float32 and rounded once; with
    `quantize_activations`, x as its int8 blocks stand for it."""
    check_int8_linear_args(x, q, scale, bias, quantize_activations)
    acts = quantize_activations_q8(x) if quantize_activations else x.float()
    out = F.linear(acts, dequantize_int8(q, scale), None if bias is None else bias.float())
    return out.to(x.dtype)


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                quantize_activations: bool = False):
    """`linear_int8_ref`'s result, through the C++ kernel where it is faster (float32 sums either way). The
    kernel records nothing for autograd: it serves inference."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if (x.is_cpu and 0 < rows.shape[0] <= KERNEL_MAX_ROWS and q.is_contiguous()
            and kernel_backend() == "auto"):
        kernels = small_m_kernels()
        if kernels is not None:
            check_int8_linear_args(x, q, scale, bias, quantize_activations)
            out = kernels.linear_int8(rows.float().contiguous(), q, scale.contiguous(), bias, quantize_activations)
            out = out if x.dtype == torch.float32 else out.to(x.dtype)
            return out if x.dim() == 2 else out.view(*x.shape[:-1], q.shape[0])
    return linear_int8_ref(x, q, scale, bias, quantize_activations)
