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


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _param(loc: tuple, fields: set[str], msg: str) -> str | None:
    """'body.messages.0.content' from pydantic's loc; for a model-level check, the field its message names."""
    parts = [str(p) for p in loc if p != "body"]
    # union members add their type names to loc (`str`, `list[int]`, ...): keep the path to the field only
    path = []
    for p in parts:
        if p.isdigit() or p.isidentifier():
            path.append(p)
        else:
            break
    if path:
        return ".".join(path)
    words = msg.removeprefix("Value error, ").split()
    return words[0] if words and words[0] in fields else None


def validation_error_response(exc: RequestValidationError, fields: set[str]) -> JSONResponse:
    errors = exc.errors()
    if not errors:
        return error_response(400, "invalid request body")
    first = errors[0]
    loc, msg = tuple(first.get("loc", ())), str(first.get("msg", "invalid value"))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}")
    if kind == "missing" and loc == ("body",):
        return error_response(400, "the request needs a JSON body")
    if kind == "model_attributes_type" and loc == ("body",):
        return error_response(400, "the request body must be a JSON object")
    param = _param(loc, fields, msg)
    message = msg.removeprefix("Value error, ")
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
    async def _http(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = "no such route; see /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):  # a bug of ours: say so without a traceback
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}"[:500])
