"""The one way the data plane starts a gRPC server: the graph's token checked on every call, message
sizes capped, concurrent streams bounded, keepalive on, and bound to the address it is given."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

from expertmesh.transport.auth import server_interceptor
from expertmesh.transport.settings import DataPlaneSettings


def start_server(add_servicer: Callable, servicer, host: str, *, secret: str, settings: DataPlaneSettings,
                 what: str, port: int = 0):
    """Serves `servicer` (registered with the generated `add_..._to_server`) on host:port (0: a free port);
    returns (server, "host:port"). Streams beyond `settings.max_concurrent_rpcs` get RESOURCE_EXHAUSTED."""
    import grpc

    # a long-lived stream holds a worker thread for its whole life: one more than the streams allowed, so a
    # refusal can still be answered
    pool = futures.ThreadPoolExecutor(max_workers=settings.max_concurrent_rpcs + 1, thread_name_prefix=what)
    server = grpc.server(pool, interceptors=[server_interceptor(secret)], options=settings.server_options(),
                         maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    add_servicer(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"{what} could not bind a gRPC port on {host}:{port}")
    server.start()
    return server, f"{host}:{bound}"
