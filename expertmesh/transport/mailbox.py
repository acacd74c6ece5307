"""Futures by key, created by whichever side comes first: the waiter or the message.

Keys start with the step they belong to, so a failed step can fail all of its waiters at once and a new
step can drop what an old one left behind. Every wait has a deadline.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from expertmesh.transport.errors import PeerFault


class Mailbox:
    def __init__(self):
        self._lock = threading.Lock()
        self._futures: dict[tuple, Future] = {}
        self._failed: dict[int | None, Exception] = {}  # failed steps (None: every step), by step

    def register(self, key: tuple) -> Future:
        """The future of `key`, created if new (already failed if its step has failed)."""
        with self._lock:
            fut = self._futures.get(key)
            if fut is None:
                fut = self._futures[key] = Future()
                error = self._failed.get(key[0], self._failed.get(None))
                if error is not None:  # a key first used after its step failed fails at once
                    fut.set_exception(error)
            return fut

    def put(self, key: tuple, value) -> None:
        fut = self.register(key)
        if not fut.done():
            fut.set_result(value)

    def fail_key(self, key: tuple, error: Exception) -> None:
        fut = self.register(key)
        if not fut.done():
            fut.set_exception(error)

    def take(self, key: tuple, what: str, timeout_s: float, peer: tuple[str, int]):
        """The value of `key`, waiting at most `timeout_s`; past it, a PeerFault blaming `peer`."""
        fut = self.register(key)
        try:
            return fut.result(timeout=timeout_s)
        except TimeoutError:
            raise PeerFault(f"no {what} within {timeout_s:g} s", *peer) from None
        finally:
            with self._lock:
                self._futures.pop(key, None)

    def fail(self, error: Exception, step: int | None = None) -> None:
        """Fails every waiter (of one step, when given); later messages of that step are dropped. The failed
        futures stay until taken, so a wait that starts after the failure raises it rather than hanging."""
        with self._lock:
            self._failed[step] = error
            for key, fut in self._futures.items():
                if (step is None or key[0] == step) and not fut.done():
                    fut.set_exception(error)

    def reset_failure(self) -> None:
        """Forgets a failure of every step (after the link that failed them is reopened)."""
        with self._lock:
            self._failed.pop(None, None)

    def drop_before(self, step: int) -> None:
        with self._lock:
            for key in [k for k in self._futures if k[0] < step]:
                del self._futures[key]
            for old in [s for s in self._failed if s is not None and s < step]:
                del self._failed[old]

    def __len__(self) -> int:
        return len(self._futures)

