"""Limits of the data plane, the same for every transport and every actor of a graph."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class DataPlaneSettings:
    # The longest one data-plane wait may last (a shard's answer to one layer, an attention actor's hidden
    # states): a peer that takes longer is taken for stalled, and the step fails and is retried.
    timeout_s: float = 30.0
    max_message_bytes: int = 256 * MIB  # hidden states of a 2048-token prefill at H=7168 in fp32: 56 MiB
    max_concurrent_rpcs: int = 16  # per server: streams are long-lived, one per peer
    keepalive_s: float = 10.0  # HTTP/2 pings on idle connections, so a dead peer is noticed between steps

    def __post_init__(self) -> None:
        for name in ("timeout_s", "keepalive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        for name in ("max_message_bytes", "max_concurrent_rpcs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def _common(self) -> list[tuple[str, int]]:
        keepalive_ms = int(self.keepalive_s * 1000)
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", max(1000, keepalive_ms // 2)),
            ("grpc.keepalive_permit_without_calls", 1),
        ]

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC options of a client channel: the size caps, and keepalive pings on idle connections."""
        return [*self._common(), ("grpc.http2.max_pings_without_data", 0)]

    def server_options(self) -> list[tuple[str, int]]:
        """gRPC options of a server: the same, and it accepts the clients' keepalive pings."""
        min_ping_ms = max(1000, int(self.keepalive_s * 1000) // 2)
        return [*self._common(), ("grpc.http2.min_recv_ping_interval_without_data_ms", min_ping_ms),
                ("grpc.http2.max_ping_strikes", 0)]
