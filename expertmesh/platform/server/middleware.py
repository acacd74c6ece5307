"""ASGI middleware that guards every route before FastAPI parses anything: API keys, body size, JSON depth.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so streaming responses pass straight through and a client
that disconnects is seen by the handler.
"""

from __future__ import annotations

import hmac
import json
import re
from itertools import accumulate

from expertmesh.platform.server.errors import error_body

# No key needed: load balancers and Kubernetes probe /health (which then says only ok or unhealthy); the
# dashboard page holds no data and fetches it with the key from its address's fragment, which browsers never
# send to a server.
OPEN_PATHS = frozenset({"/health", "/dashboard"})
# A JSON string, or the rest of the body after an unterminated one. Unrolled (no alternation inside the
# repeat) and with an optional closing quote, so one pass over any body is linear: the plain
# `"(?:[^"\\]|\\.)*"` rescans to the end from every quote of an unterminated `"\"\"\"...`, quadratic in
# the body, which blocks the event loop for an hour on a 1 MB body.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256  # how a byte moves the nesting depth
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


async def _send_error(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), without parsing it.

    Linear and in C but for one `accumulate` step per bracket: it runs on the event loop for every body."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets), initial=0))


def _bearer_ok(auth: bytes, keys: list[bytes]) -> bool:
    scheme, _, token = auth.partition(b" ")
    token = token.strip()
    return scheme.lower() == b"bearer" and any(hmac.compare_digest(token, k) for k in keys)


def has_valid_key(headers, keys: tuple[str, ...]) -> bool:
    """Whether request headers (a Starlette `Headers`) carry one of `keys` as a bearer token."""
    return _bearer_ok(headers.get("authorization", "").encode(), [k.encode() for k in keys])


class AuthMiddleware:
    """`Authorization: Bearer KEY` on every route but OPEN_PATHS, when keys are configured."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        if _bearer_ok(auth, self.keys):
            return await self.app(scope, receive, send)
        message = ("missing API key: send 'Authorization: Bearer <key>'" if not auth
                   else "invalid API key in the Authorization header")
        await _send_error(send, 401, message, [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """Reads a request body up to `max_bytes` (413 past it) and refuses JSON nested deeper than
    `max_depth` (400), then hands the buffered body on."""

    def __init__(self, app, max_bytes: int, max_depth: int):
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_error(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if json_depth(body) > self.max_depth:
            return await _send_error(send, 400, f"the JSON body is nested deeper than {self.max_depth} levels")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)
