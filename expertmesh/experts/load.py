"""Per-expert token counts per MoE layer: since the start, and over a sliding window of recent steps.

Whoever routes keeps one (the router actor in actor mode, the local executor in local mode) and adds each
layer's per-expert counts as it routes; metrics, the dashboard, the health figures and the rebalancer all
read the same numbers, whichever way the model runs. numpy over counts: no torch, no Ray.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np


class ExpertLoad:
    def __init__(self, moe_layers: Sequence[int], num_experts: int, *, window_steps: int = 256):
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.moe_layers = sorted(moe_layers)
        self.num_experts = num_experts
        self.window_steps = window_steps
        self._row = {layer: i for i, layer in enumerate(self.moe_layers)}
        shape = (len(self.moe_layers), num_experts)
        self._total = np.zeros(shape, dtype=np.int64)  # finished steps since the start
        self._step = np.zeros(shape, dtype=np.int64)  # the step under way
        self._window_sum = np.zeros(shape, dtype=np.int64)  # the finished steps still in the window
        self._window: deque[np.ndarray] = deque()

    def row(self, layer: int) -> int:
        """`layer`'s row in `array()` and `add_all`: its place in `moe_layers`."""
        row = self._row.get(layer)
        if row is None:
            raise ValueError(f"layer {layer} is not a MoE layer here; MoE layers are {self.moe_layers}")
        return row

    def add(self, layer: int, counts: Sequence[int] | np.ndarray) -> None:
        """Adds one layer's routing decisions of the step under way: `counts[e]` (token, expert) pairs to e."""
        row = self.row(layer)
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (self.num_experts,) or (counts < 0).any():
            raise ValueError(f"counts of layer {layer} must be {self.num_experts} non-negative integers, "
                             f"got shape {list(counts.shape)}")
        self._step[row] += counts

    def add_all(self, counts: np.ndarray) -> None:
        """Adds every MoE layer's routing decisions of the step under way at once: `counts` [layers, experts],
        rows in `moe_layers` order."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != self._step.shape or (counts < 0).any():
            raise ValueError(f"counts must be {list(self._step.shape)} non-negative integers (a row per MoE layer "
                             f"{self.moe_layers}), got shape {list(counts.shape)}")
        self._step += counts

    def finish_step(self) -> None:
        """Closes the step under way into the totals and the sliding window."""
        step, self._step = self._step, np.zeros_like(self._step)
        self._total += step
        self._window.append(step)
        self._window_sum += step
        if len(self._window) > self.window_steps:
            self._window_sum -= self._window.popleft()

    def array(self, window: bool = False) -> np.ndarray:
        """[num_moe_layers, num_experts] counts, rows in `moe_layers` order (a copy)."""
        return (self._window_sum if window else self._total + self._step).copy()

    def counts(self, window: bool = False) -> dict[int, list[int]]:
        """(token, expert) pairs routed to each expert of each MoE layer: since the start (the step under way
        included), or with `window` over the last `window_steps` finished steps."""
        rows = self.array(window)
        return {layer: rows[i].tolist() for i, layer in enumerate(self.moe_layers)}
