"""RMSNorm Triton kernel: one program per row, the whole row in registers."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, hidden, stride_x_row, stride_out_row, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < hidden
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=in_row, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    # Round to the input dtype before the weight multiply, as transformers does.
    y = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + cols, (weight * y).to(out_ptr.dtype.element_ty), mask=in_row)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as ``rms_norm_ref``, forward only."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    x_rows = x.reshape(-1, hidden)  # [N, H]
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x_rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x_rows.shape[0] > 0:
        block_h = triton.next_power_of_2(hidden)
        num_warps = min(max(block_h // 256, 1), 16)
        _rms_norm_kernel[(x_rows.shape[0],)](
            x_rows, weight, out, hidden, x_rows.stride(0), out.stride(0), eps, BLOCK_H=block_h, num_warps=num_warps
        )
    return out.view(x.shape)
