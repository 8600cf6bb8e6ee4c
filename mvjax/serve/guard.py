"""The speech server's guard: plain ASGI middleware in front of every route (body size limits, the API
key, cross-site refusal, refusal while draining, the request counter and the one access log line per
request or WebSocket) and the CORS middleware around it."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.datastructures import Headers

from mvjax.serve.errors import error_response, loggable
from mvjax.serve.settings import ServerSettings
from mvjax.serve.text_stream import PATH as SOCKET_PATH
from mvjax.serve.text_stream import refuse_socket

log = logging.getLogger("mvjax.serve")
OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/favicon.ico")
DOCS_ASSETS = "/docs/assets"  # the docs page's script, style and icon (open like the page)
UPLOAD_PATHS = ("/v1/voices", "/tts")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # everything else changes state or spends compute


class BodyTooLarge(HTTPException):
    """A request body that grew past its limit while it was read (no or a false Content-Length)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


class Guard:
    """Plain ASGI middleware (it leaves the client's disconnect visible to the routes, which
    Starlette's ``BaseHTTPMiddleware`` hides): body size limits, the API key, refusal while
    draining, cross-site refusal, the request counter and the access log line."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    def _refusal(self, scope, headers: Headers, limit: int) -> Optional[Response]:
        settings = self.state.settings
        path, method = scope["path"], scope["method"]
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error_response(413, f"the request body is over the limit of {limit} bytes")
        if method not in SAFE_METHODS:
            refused = _cross_site(headers, scope.get("scheme", "http"), settings.cors_origins)
            if refused is not None:
                return error_response(403, refused)
        if settings.api_key and not _open(path, settings) and not _authorised(headers, settings.api_key):
            return error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                  headers={"WWW-Authenticate": "Bearer"})
        if self.state.draining and method != "GET":
            return error_response(503, "the server is shutting down; try another instance",
                                  headers={"Retry-After": "5", "Connection": "close"})
        return None

    def _socket_refusal(self, scope, headers: Headers) -> Optional[tuple[int, str]]:
        """(HTTP status, message) when a WebSocket may not go on; the same guards as a request that
        changes state (a page of another site may open a socket: cross-site WebSocket hijacking)."""
        settings = self.state.settings
        scheme = "https" if scope.get("scheme") == "wss" else "http"
        refused = _cross_site(headers, scheme, settings.cors_origins)
        if refused is not None:
            return 403, refused
        if settings.api_key and not _authorised(headers, settings.api_key):
            return 401, "missing or wrong API key (send 'Authorization: Bearer <key>')"
        if self.state.draining:
            return 503, "the server is shutting down; try another instance"
        return None

    async def _socket(self, scope, receive, send):
        """A WebSocket: refused (an error frame, then a close with its code) or passed on; counted and
        logged (one line, with the close code as its status) like a request."""
        start = time.monotonic()
        path = scope["path"]
        code = [None]

        async def receive_watched():
            message = await receive()
            if message["type"] == "websocket.disconnect" and code[0] is None:
                code[0] = message.get("code", 1005)
            return message

        async def send_watched(message):
            if message["type"] == "websocket.close" and code[0] is None:
                code[0] = message.get("code", 1000)
            elif message["type"] == "websocket.http.response.start" and code[0] is None:
                code[0] = message["status"]
            await send(message)

        try:
            refusal = self._socket_refusal(scope, Headers(scope=scope))
            if refusal is not None:
                await refuse_socket(receive_watched, send_watched, *refusal)
            else:
                await self.app(scope, receive_watched, send_watched)
        finally:
            status = str(code[0] or 1006)
            self.state.metrics.requests.labels(path if path in _ROUTES else "other", status).inc()
            log.info("WS %s %s %.0f ms%s", loggable(path), status, (time.monotonic() - start) * 1000,
                     job_words(scope, self.state.settings))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self._socket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        path, method = scope["path"], scope["method"]
        settings = self.state.settings
        limit = settings.max_upload_body if path in UPLOAD_PATHS else settings.max_json_bytes
        status = [500]
        received = [0]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def receive_bounded():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            refusal = self._refusal(scope, Headers(scope=scope), limit)
            if refusal is not None:
                await refusal(scope, receive, send_counted)
            else:
                await self.app(scope, receive_bounded, send_counted)
        finally:
            route = path if path in _ROUTES else ("/v1/voices/{name}" if path.startswith("/v1/voices/") else "other")
            self.state.metrics.requests.labels(route, str(status[0])).inc()
            log.info("%s %s %d %.0f ms%s", loggable(method, 16), loggable(path), status[0],
                     (time.monotonic() - start) * 1000, job_words(scope, settings))


def job_words(scope, settings: ServerSettings) -> str:
    """What a speech request's access line adds about its synthesis (the job the route left in the
    request's state; with ``--log-text`` its text, escaped), so each request logs one INFO line."""
    job = scope.get("state", {}).get("job")
    if job is None:
        return ""
    text = f", text '{loggable(' '.join(job.pieces), settings.max_input_chars)}'" if settings.log_text else ""
    return f" ({job.summary()}{text})"


def _origin(url: str) -> Optional[tuple[str, str, int]]:
    """(scheme, host, port) of an http(s) origin, or None for anything else (``null``, garbage)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def _cross_site(headers: Headers, scheme: str, allowed: tuple[str, ...]) -> Optional[str]:
    """Why a state-changing request comes from another site's page, or None when it may go on.

    A browser names the page's origin in ``Origin``: it must be the server's own (the request's
    scheme and ``Host``, however the server was reached) or one given with ``--cors-origin``.
    Without ``Origin``, ``Sec-Fetch-Site: cross-site`` still marks another site's page; a client
    that is not a browser sends neither and is let through (the API key guards it, when set)."""
    origin = headers.get("origin")
    if origin is None:
        if headers.get("sec-fetch-site", "").strip().lower() == "cross-site":
            return "cross-site request refused: it comes from another site's page"
        return None
    own = _origin(f"{scheme}://{headers.get('host', '')}")
    theirs = _origin(origin)
    if theirs is not None and (theirs == own or "*" in allowed or theirs in {_origin(o) for o in allowed}):
        return None
    return (f"cross-origin request refused: origin {loggable(origin, 100)!r} is neither this server's own "
            "nor one allowed with --cors-origin")


class JsonCors(CORSMiddleware):
    """Starlette's CORS middleware answering a refused preflight in the server's JSON error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        kept = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        reason = bytes(response.body).decode(errors="replace").strip()
        return error_response(response.status_code, f"CORS preflight refused: {reason}", headers=kept)


def install_middleware(app: FastAPI, state) -> None:
    settings = state.settings
    app.add_middleware(Guard, state=state)
    if settings.cors_origins:  # outside the guard: it answers preflight requests, which carry no key
        app.add_middleware(JsonCors, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Seed", "X-Sample-Rate", "X-Time-To-First-Audio"])


_ROUTES = {"/", "/health", "/metrics", "/v1/audio/speech", "/v1/audio/voices", "/v1/voices", "/v1/models", "/tts",
           SOCKET_PATH}


def _open(path: str, settings: ServerSettings) -> bool:
    """Paths served without the API key: the page, health, docs (and their assets); ``/metrics`` only when the
    operator made it public (``--public-metrics``: a scraper without the key)."""
    return (path in OPEN_PATHS or path.startswith(("/static/", DOCS_ASSETS + "/"))
            or (path == "/metrics" and settings.public_metrics))


def _authorised(headers: Headers, key: str) -> bool:
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
