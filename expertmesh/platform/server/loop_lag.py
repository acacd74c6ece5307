"""How late the server's event loop runs what is due: a task that sleeps a short interval and measures how
much longer than asked it slept. Every request on the loop waits that long on top of its own work, so a
handler that blocks the loop (a big answer encoded in place, a long tokenization) shows here first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

LAG_INTERVAL_S = 0.05


class LoopLagMonitor:
    def __init__(self, observe: Callable[[float], None], interval_s: float = LAG_INTERVAL_S):
        self._observe, self.interval_s = observe, interval_s
        self._task: asyncio.Task | None = None

    def ensure_running(self) -> None:
        """Starts the probe on the running loop, once (called from a request: the app has no loop before)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="expertmesh-loop-lag")

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self._observe(max(0.0, time.perf_counter() - start - self.interval_s))
