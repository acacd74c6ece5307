"""Per-expert token counts per MoE layer: since the start, and over a sliding window of recent steps.

The router actor keeps one (actor mode) and the local executor keeps one (local mode), so metrics, the
dashboard and the rebalancer read the same figures whichever way the model runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch


class ExpertLoad:
    def __init__(self, moe_layers: Sequence[int], num_experts: int, *, window_steps: int = 256):
        self.moe_layers = sorted(moe_layers)
        self.num_experts = num_experts
        self._row = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._total = torch.zeros(len(self.moe_layers), num_experts, dtype=torch.int64)
        self._step = torch.zeros_like(self._total)
        self._window: deque[torch.Tensor] = deque(maxlen=window_steps)

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Counts one layer's routing decisions ([T, K] expert ids) into the current step."""
        counts = torch.bincount(topk_ids.reshape(-1).cpu(), minlength=self.num_experts)
        self._step[self._row[layer]] += counts

    def finish_step(self) -> None:
        """Closes the current step's counts into the totals and the sliding window."""
        self._total += self._step
        self._window.append(self._step)
        self._step = torch.zeros_like(self._total)

    def counts(self, window: bool = False) -> dict[int, list[int]]:
        """(token, expert) pairs routed to each expert of each MoE layer: since the start (the step under way
        included), or with `window` over the last `window_steps` finished steps."""
        if window:
            rows = torch.stack(list(self._window)).sum(0) if self._window else torch.zeros_like(self._total)
        else:
            rows = self._total + self._step
        return {layer: rows[i].tolist() for i, layer in enumerate(self.moe_layers)}
