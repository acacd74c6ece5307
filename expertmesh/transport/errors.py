"""Errors of the data plane. A failure that one peer caused names it, so the executor can replace a peer
that still answers Ray's pings but no longer serves its data plane (stalled, or sending bad answers)."""

from __future__ import annotations


class DataPlaneError(RuntimeError):
    """A data-plane peer failed or refused a message; the message names which and why."""


class PeerFault(DataPlaneError):
    """`role` `index` (e.g. "shard" 1, "attention" 0, "router" 0) stalled past its deadline or answered
    with something that does not fit the request: replace it."""

    def __init__(self, message: str, role: str, index: int):
        super().__init__(message, role, index)
        self.message, self.role, self.index = message, role, index

    def __str__(self) -> str:
        return self.message
