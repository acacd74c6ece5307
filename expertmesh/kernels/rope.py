"""Rotary position embedding applied to [T, heads, dim] with precomputed cos/sin [T, dim/2]."""

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotates channel pairs of x [T, heads, dim] by the angles whose cos/sin [T, dim/2] are given.

    `interleave` pairs (x0, x1), (x2, x3), ... (DeepSeek's layout) and returns the rotated channels
    de-interleaved (evens then odds); otherwise pairs channel i with i + dim/2 (rotate-half). Queries and
    keys share the layout, so their dot products equal those of an in-place interleaved rotation.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
