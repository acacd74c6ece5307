"""A cached readiness check: `/health` needs no key, so one caller must not be able to make the server ping
every actor of its graph as often as it likes. A check result is served for `max_age_s`; callers that
arrive while a check runs wait for that one instead of starting their own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

HEALTH_MAX_AGE_S = 1.0


class HealthCache:
    def __init__(self, check: Callable[[], list[str]], *, max_age_s: float = HEALTH_MAX_AGE_S):
        self._check, self.max_age_s = check, max_age_s
        self._lock = threading.Lock()
        self._result: list[str] = []
        self._at = float("-inf")

    def get(self) -> list[str]:
        with self._lock:  # one check at a time; the others wait for it and read its result
            if time.monotonic() - self._at > self.max_age_s:
                try:
                    self._result = list(self._check())
                except Exception as e:  # a check that cannot finish is itself a problem to report
                    self._result = [f"health check failed: {type(e).__name__}: {e}"]
                self._at = time.monotonic()
            return list(self._result)
