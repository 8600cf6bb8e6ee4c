"""The speech server's errors: one JSON shape for every refusal and failure.

``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) with a 4xx/5xx status; a
request the schema rejects is a 400 naming the field; anything unexpected is logged and answered
with a bare 500, so no traceback reaches a client.
"""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mvjax.serve")


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a one-line ``message``, the request field at fault."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers, self.code = status, message, param, headers, code


LOG_TEXT_LIMIT = 200  # characters of one client-given string in a log line


def loggable(text, limit: int = LOG_TEXT_LIMIT) -> str:
    """Client-given text (a path, a name, a header, a message quoting input) made safe for a log
    line: backslash escapes for line breaks, NUL, other control characters, non-ASCII and the
    backslash itself (so no client can write a line of its own), at most ``limit`` characters
    before escaping (then ``...``)."""
    text = str(text)
    escaped = text[:limit].encode("unicode_escape").decode("ascii")
    return escaped + "..." if len(text) > limit else escaped


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, headers=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_message(errors: list, what: str) -> tuple[str, Optional[str]]:
    """(message, field) for the first of pydantic's ``errors`` about a JSON object (``what``: how to name it)."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "form")]
    param = loc[0] if loc else None  # the request's fields are flat; later parts name union members
    kind = first.get("type", "")
    if kind == "json_invalid":
        message, param = f"{what} is not valid JSON", None
    elif kind == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif kind == "missing":
        message = f"{param} is required"
    elif kind in ("model_attributes_type", "dict_type"):
        message = f"{what} must be a JSON object"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return message, param


def install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.headers, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(400, *validation_message(exc.errors(), "the request body"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", loggable(request.method, 16), loggable(request.url.path), exc_info=exc)
        return error_response(500, "internal server error")
