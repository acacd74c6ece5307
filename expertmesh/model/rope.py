"""Rotary position embedding: inverse frequencies (default, linear, YaRN) and the rotation itself."""

from __future__ import annotations

import math

import torch

from expertmesh.kernels.rope import apply_rope
from expertmesh.model.config import RopeConfig, yarn_mscale


def rope_inv_freq(rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [dim/2] float32, attention_factor applied to cos/sin)."""
    exponents = torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim
    pos_freqs = rope.theta**exponents  # [dim/2]
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rope.rope_type == "linear":
        return 1.0 / (pos_freqs * rope.factor), 1.0
    return _yarn(rope, pos_freqs)


def _yarn(rope: RopeConfig, pos_freqs: torch.Tensor) -> tuple[torch.Tensor, float]:
    factor, dim, base = rope.factor, rope.dim, rope.theta
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        original = rope.original_max_position_embeddings
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # high-frequency channels keep their original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, rope: RopeConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = rope.interleave
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (dtype, inv_freq's storage): cos, sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, dim/2] of `positions` [T] (int64), times the attention factor, in `dtype`: rows of a
        table of positions 0 .. n - 1 (n doubled past the largest position asked so far). Each row is what
        `_cos_sin` gives for its position alone (elementwise ops), and a decode step reads 2 rows instead of
        running 8 ops. On the CPU only: an index past a CUDA table's end is a device-side assert, not an error."""
        if not positions.is_cpu:
            return self._cos_sin(positions, dtype)
        key = (dtype, self.inv_freq.data_ptr())
        table = self._tables.get(key)
        if table is not None:
            try:
                return table[0].index_select(0, positions), table[1].index_select(0, positions)
            except IndexError:  # past the table's end (or negative, which the formula below takes as it is)
                pass
        if positions.numel() == 0 or int(positions.min()) < 0:
            return self._cos_sin(positions, dtype)
        rows = 1 << max(10, int(positions.max()).bit_length())
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in and out of inference mode
            table = self._tables[key] = self._cos_sin(torch.arange(rows), dtype)
        return table[0].index_select(0, positions), table[1].index_select(0, positions)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq  # [T, dim/2]
        cos = (freqs.cos() * self.attention_factor).to(dtype)
        sin = (freqs.sin() * self.attention_factor).to(dtype)
        return cos, sin

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates x [T, heads, dim] with cos/sin [T, dim/2] (see kernels.rope.apply_rope)."""
        return apply_rope(x, cos, sin, self.interleave)
