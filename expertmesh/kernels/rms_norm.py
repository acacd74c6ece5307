"""RMSNorm, torch reference (transformers' semantics, bit for bit)."""

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * normalize(x)``, normalised in fp32 and rounded back to ``x.dtype`` first.

    The rounding before the weight multiply is what transformers' Llama/DeepSeek RMSNorm does;
    keeping it makes our hidden states match theirs exactly. The output dtype is the promotion
    of ``weight.dtype`` and ``x.dtype``.
    """
    x32 = x.float()  # [..., H]
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)
