"""OpenAI-style error bodies, `{"error": {"message", "type", "param", "code"}}`, for every error path.

FastAPI's defaults answer `{"detail": ...}`; OpenAI clients read `error.message`, so every handler here
turns its exception into that shape, naming the field at fault in `param` where there is one.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to answer with: status, message, and the field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def server_failure(request_id: str, exc: BaseException) -> APIError:
    """What a client is told when the server failed its request: the same words every time and the request
    id. What failed (a shard's address, a gRPC status, an exception's text) goes only to the server log,
    under that id."""
    logger.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc)
    return APIError(503, f"the server could not complete the request (request id {request_id}); it may "
                            f"succeed if retried", code="server_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# Python type names pydantic may put in `loc` for the union member it tried; request fields are lowercase
# identifiers, never one of these.
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "dict", "list", "none"})


def _is_step(part) -> bool:
    """Whether a `loc` entry is a step of the path to a value (an index or a field name) rather than the name
    of a union member pydantic tried (`str`, `list[int]`, `constrained-str`, `TextPart`)."""
    if isinstance(part, int):
        return True
    return part.isidentifier() and part.islower() and part not in _TYPE_NAMES


def _path(loc) -> str:
    """OpenAI's spelling of a field path, `messages[0].content`, from a loc without `body` and union members."""
    out = ""
    for part in loc:
        if not _is_step(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def _union_head(loc: tuple) -> tuple | None:
    """The loc of the union value an error is about (the entries before the first member name), if any."""
    for i, part in enumerate(loc):
        if not _is_step(part):
            return loc[:i]
    return None


def _pick(errors: list[dict]) -> tuple[tuple, str]:
    """The loc and message to report. A value that fits no member of a union gets an error per member, the
    first of which (`Input should be a valid string` for a list) is rarely the useful one; report instead
    the member that got furthest: a value error over a type error, deep in the value over at its top."""
    first = errors[0]
    head = _union_head(first["loc"])
    if head is None:
        return first["loc"], first["msg"]
    members: dict = {}  # member name -> its first error
    for e in errors:
        loc = e["loc"]
        if len(loc) > len(head) and loc[:len(head)] == head and not _is_step(loc[len(head)]):
            members.setdefault(loc[len(head)], e)

    def rank(e: dict) -> tuple:
        below = [p for p in e["loc"][len(head) + 1:] if _is_step(p)]
        wrong_type = e["type"].endswith("_type")
        reached = [-p for p in below if isinstance(p, int)]  # the later the item it failed at, the better
        return 2 if wrong_type and not below else int(wrong_type), -len(below), reached

    best = min(members.values(), key=rank)
    if rank(best)[0] < 2:
        return best["loc"], best["msg"]
    # the value's type fits no member: say which types would
    prefix = "Input should be "
    wants = dict.fromkeys(e["msg"].removeprefix(prefix) for e in members.values())
    return head, prefix + " or ".join(wants)


def validation_error_response(exc: RequestValidationError, fields: set[str]) -> JSONResponse:
    """A 400 naming the first field at fault; `fields` are those a model-level check's message may start with."""
    errors = exc.errors()
    if not errors:
        return error_response(400, "invalid request body")
    first = errors[0]
    loc, kind = tuple(first.get("loc", ())), first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return error_response(400, f"the request body is not valid JSON: {detail}")
    if kind == "missing" and loc == ("body",):
        return error_response(400, "the request needs a JSON body")
    if kind == "model_attributes_type" and loc == ("body",):
        if isinstance(first.get("input"), (bytes, bytearray)):  # FastAPI parses JSON only when told it is JSON
            return error_response(400, "send the request body as JSON, with 'Content-Type: application/json'")
        return error_response(400, "the request body must be a JSON object")
    loc, msg = _pick(errors)
    message = str(msg).removeprefix("Value error, ")
    param = _path(loc[1:] if loc[:1] == ("body",) else loc) or None
    if param is None:  # a check over the whole body: its message starts with the field it is about
        word = message.split(maxsplit=1)[0] if message else ""
        param = word if word in fields else None
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return error_response(400, message, param=param)


def install(app: FastAPI, fields: set[str]) -> None:
    """Registers the handlers; `fields` are the request fields a model-level error may name."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return validation_error_response(exc, fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = "no such route; see /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow")
            message = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug of ours: the details go to the log only
        request_id = getattr(request.state, "request_id", "-")
        logger.exception("request %s: unhandled error", request_id)
        return error_response(500, f"internal server error (request id {request_id})", code="internal_error")
