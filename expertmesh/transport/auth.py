"""Only a graph's own actors talk on its data plane.

The executor makes a secret when it builds a graph and hands it to each actor through Ray (actor
arguments travel inside the cluster, never on the data plane). gRPC clients send it as call metadata on
every stream; each server checks it before any handler runs, so a stranger who reaches a port gets
UNAUTHENTICATED and touches no state. Members of a torch.distributed group prove it to each other right
after joining (`proof`), since gloo itself takes any peer that reaches its rendezvous.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_METADATA = "x-expertmesh-graph-token"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def call_metadata(secret: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA, secret), *extra)


def token_matches(secret: str, metadata) -> bool:
    """Whether gRPC invocation metadata carries `secret` (compared in constant time)."""
    sent = next((value for key, value in metadata or () if key == TOKEN_METADATA), None)
    return isinstance(sent, str) and hmac.compare_digest(sent.encode(), secret.encode())


def proof(secret: str, rank: int) -> bytes:
    """What rank `rank` of a collective group shows the others: it cannot be made without the secret, and
    one rank's proof is no use to another."""
    return hmac.new(secret.encode(), f"expertmesh-collective-rank:{rank}".encode(), hashlib.sha256).digest()


def server_interceptor(secret: str):
    """A gRPC server interceptor that refuses every call without the graph's token."""
    import grpc

    def refuse(request_iterator_or_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "this data-plane server serves only its own graph's actors")

    refused = {
        "unary_unary": grpc.unary_unary_rpc_method_handler(refuse),
        "stream_stream": grpc.stream_stream_rpc_method_handler(refuse),
        "unary_stream": grpc.unary_stream_rpc_method_handler(refuse),
        "stream_unary": grpc.stream_unary_rpc_method_handler(refuse),
    }

    class _TokenCheck(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            if token_matches(secret, handler_call_details.invocation_metadata):
                return continuation(handler_call_details)
            handler = continuation(handler_call_details)  # an unknown method stays UNIMPLEMENTED
            if handler is None:
                return None
            kind = ("stream" if handler.request_streaming else "unary") + "_" + (
                "stream" if handler.response_streaming else "unary")
            return refused[kind]

    return _TokenCheck()
