"""The HTTP face of the speech server: a FastAPI app over one :class:`~mvjax.serve.worker.SpeechWorker`.

    app = create_app(tts, registry, ServerSettings())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``POST /v1/audio/speech`` (OpenAI-compatible, plus ``seed``, ``temperature``, ``top_p``,
``guidance_scale``, ``decoder``, ``enhance`` and ``stream``), ``GET /v1/audio/voices`` and
``GET|POST /v1/voices``, ``DELETE /v1/voices/{name}``, the reference server's ``POST /tts`` form
(without ``speaker_ref_path``: this server never opens a path or URL named in a request),
``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``/docs``, and the web page at ``/``.

Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx
status; no traceback reaches a client (unexpected failures are logged and answered with 500).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from mvjax.audio.stream import supported_formats
from mvjax.inference.options import SamplingConfig
from mvjax.serve.errors import ApiError, error_response, install_errors, loggable
from mvjax.serve.metrics import Metrics
from mvjax.serve.output import EnhancerPool
from mvjax.serve.settings import ServerSettings
from mvjax.serve.speech import (
    MAX_SEED,
    STREAM_SSE,
    SpeechRequest,
    SpeechTask,
    check_speech,
    check_text,
    random_or,
    sampling_of,
    speak,
    streaming_of,
    voice_embedding,
)
from mvjax.serve.voices import (
    InvalidVoiceName,
    VoiceError,
    VoiceExists,
    VoiceProtected,
    VoiceRegistry,
)
from mvjax.serve.worker import SpeechWorker

log = logging.getLogger("mvjax.serve")
# The reference server's form names the guidance scale "guidance"; its default and bounds are the library's.
GUIDANCE, TOP_P = SamplingConfig.spec("guidance_scale"), SamplingConfig.spec("top_p")
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/favicon.ico")
DOCS_ASSETS = "/docs/assets"  # the docs page's script, style and icon (open like the page)
UPLOAD_PATHS = ("/v1/voices", "/tts")
NAME_ERRORS = (InvalidVoiceName, VoiceProtected, VoiceExists)  # upload refusals about the name, not the file
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # everything else changes state or spends compute


class State:
    """What the routes share: the model, the voices, the worker, the settings."""

    def __init__(self, tts, registry: VoiceRegistry, settings: ServerSettings, metrics: Metrics):
        self.tts, self.registry, self.settings, self.metrics = tts, registry, settings, metrics
        self.pool = EnhancerPool()
        self.worker: Optional[SpeechWorker] = None
        self.draining = False


def create_app(tts, registry: VoiceRegistry, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The app for one loaded model (``tts``: :class:`mvjax.TTS`). The worker starts with the app
    (its lifespan) and, at shutdown, finishes the requests in flight before it stops."""
    metrics = Metrics()
    state = State(tts, registry, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker = SpeechWorker(tts, settings.options, settings.max_queue, on_batch=_on_batch(state),
                                    on_drop=lambda job, error: metrics.dropped.labels(type(error).__name__).inc(),
                                    batch_wait=settings.batch_wait_s)
        try:
            yield
        finally:
            state.draining = True
            await run_in_threadpool(state.worker.drain, settings.timeout_s)
            state.worker.close()
            state.pool.close()

    # /docs (Swagger UI) with its script, style and icon served from the installed fastapi-offline
    # package under DOCS_ASSETS: the page works with no network (no CDN). No ReDoc: its page still
    # loads an image from its vendor's CDN.
    app = FastAPIOffline(title="mvjax speech server", version="0.1.0", lifespan=lifespan, static_url=DOCS_ASSETS,
                         redoc_url=None,
                         description="MetaVoice-1B text to speech on mvjax: an OpenAI-compatible API, voices, "
                                     "streaming.")
    app.state.mvjax = state
    _install_middleware(app, state)
    install_errors(app)
    _speech_routes(app, state)
    _voice_routes(app, state)
    _service_routes(app, state)
    return app


def _on_batch(state: State):
    def record(stats):
        state.metrics.batch(stats)
        log.debug("batch: %d chunks of %d requests (%d started), %d tokens, %.2f s (stage 1 %.2f s)", stats.chunks,
                  stats.utterances, stats.started, stats.tokens, stats.seconds, stats.stage1_seconds)

    return record


# --- middleware: body limits, auth, access log, CORS ----------------------------------------


class BodyTooLarge(HTTPException):
    """A request body that grew past its limit while it was read (no or a false Content-Length)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


class Guard:
    """Plain ASGI middleware (it leaves the client's disconnect visible to the routes, which
    Starlette's ``BaseHTTPMiddleware`` hides): body size limits, the API key, refusal while
    draining, cross-site refusal, the request counter and the access log line."""

    def __init__(self, app, state: State):
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

    async def __call__(self, scope, receive, send):
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
                     (time.monotonic() - start) * 1000, _job_words(scope, settings))


def _job_words(scope, settings: ServerSettings) -> str:
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


def _install_middleware(app: FastAPI, state: State) -> None:
    settings = state.settings
    app.add_middleware(Guard, state=state)
    if settings.cors_origins:  # outside the guard: it answers preflight requests, which carry no key
        app.add_middleware(JsonCors, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Seed", "X-Sample-Rate", "X-Time-To-First-Audio"])


_ROUTES = {"/", "/health", "/metrics", "/v1/audio/speech", "/v1/audio/voices", "/v1/voices", "/v1/models", "/tts"}


def _open(path: str, settings: ServerSettings) -> bool:
    """Paths served without the API key: the page, health, docs (and their assets); ``/metrics`` only when the
    operator made it public (``--public-metrics``: a scraper without the key)."""
    return (path in OPEN_PATHS or path.startswith(("/static/", DOCS_ASSETS + "/"))
            or (path == "/metrics" and settings.public_metrics))


def _authorised(headers: Headers, key: str) -> bool:
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _speech_routes(app: FastAPI, state: State) -> None:
    settings = state.settings

    @app.post("/v1/audio/speech", response_class=Response, tags=["speech"],
              responses={200: {"content": {"audio/mpeg": {}, "audio/wav": {}, "audio/pcm": {}}}})
    async def create_speech(req: SpeechRequest, request: Request):
        """Text to speech, OpenAI-compatible. ``stream: true`` sends audio as each chunk of the
        text is ready (chunked transfer; wav with a streaming header, raw pcm, or opus)."""
        fmt, enhance, text = check_speech(req, settings)
        embedding = voice_embedding(state, req.voice)
        sampling = sampling_of("input", temperature=float(req.temperature), top_p=float(req.top_p),
                               guidance_scale=float(req.guidance_scale))
        streaming = streaming_of(req)
        task = SpeechTask(text, embedding, random_or(req.seed), sampling, req.decoder or settings.decoder, fmt, enhance,
                          streaming is not None, req.voice, streaming, req.stream_format == STREAM_SSE)
        return await speak(state, request, task)

    @app.post("/tts", response_class=Response, tags=["speech"],
              responses={200: {"content": {"audio/wav": {}}}})
    async def reference_tts(
        request: Request,
        text: str = Form(..., description="text to speak"),
        audiodata: Optional[UploadFile] = File(None, description="a recording of the reference speaker"),
        voice: Optional[str] = Form(None, description="or: a registered voice name"),
        guidance: float = Form(GUIDANCE.default, ge=GUIDANCE.low, le=GUIDANCE.high, description=GUIDANCE.help),
        top_p: float = Form(TOP_P.default, ge=0.0, le=TOP_P.high, description=TOP_P.help + " (0: off)"),
        seed: Optional[int] = Form(None, ge=0, le=MAX_SEED),
        speaker_ref_path: Optional[str] = Form(None, description="refused: this server never opens paths or URLs"),
    ):
        """The reference server's form API (drop-in), answering with WAV. The speaker comes from
        the uploaded ``audiodata`` (or a registered ``voice``); ``speaker_ref_path`` is refused."""
        if speaker_ref_path:
            raise ApiError(400, "speaker_ref_path is not supported: this server never opens a path or URL named in "
                           "a request; upload the recording as audiodata", "speaker_ref_path")
        text = check_text(text, settings, "text")
        if audiodata is not None and audiodata.filename:
            data = await _read_upload(audiodata, settings.voice_limits.max_upload_bytes)
            try:
                embedding = await run_in_threadpool(state.registry.embed_upload, data, audiodata.filename or "")
            except VoiceError as exc:
                raise ApiError(exc.status, str(exc), "audiodata") from None
        elif voice:
            embedding = voice_embedding(state, voice)
        else:
            raise ApiError(400, "upload the reference speaker as audiodata (or name a registered voice)", "audiodata")
        sampling = sampling_of("text", guidance_scale=guidance, top_p=top_p if top_p > 0 else None)
        task = SpeechTask(text, embedding, random_or(seed), sampling, settings.decoder, "wav", settings.enhance,
                          voice=None if audiodata is not None and audiodata.filename else voice)
        return await speak(state, request, task)


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"the upload is over the limit of {limit} bytes", "file")
    return data


# --- voices ----------------------------------------------------------------------------------


def _voice_json(voice) -> dict:
    return {"name": voice.name, "object": "voice", "sha256": voice.sha256, "created": int(voice.created),
            "dims": voice.dims, "builtin": voice.builtin}


def _voice_routes(app: FastAPI, state: State) -> None:
    registry = state.registry

    @app.get("/v1/audio/voices", tags=["voices"])
    async def voice_names():
        """The voice names (Kokoro-FastAPI's shape)."""
        return {"voices": sorted(v.name for v in registry.list())}

    @app.get("/v1/voices", tags=["voices"])
    async def voices():
        return {"object": "list", "data": [_voice_json(v) for v in sorted(registry.list(), key=lambda v: v.name)]}

    @app.post("/v1/voices", status_code=201, tags=["voices"],
              responses={200: {"description": "the same recording is stored under this name already: nothing "
                                              "changed (an idempotent repeat)"}})
    async def add_voice(response: Response, name: str = Form(..., description="1-64 of [A-Za-z0-9_.-]"),
                        file: UploadFile = File(..., description="a recording of the voice (wav, flac, ogg, mp3)"),
                        replace: bool = Form(False)):
        """Add a voice from a recording: its speaker embedding is stored under ``name`` (201); the
        same recording under the same name again answers 200 with the stored voice."""
        data = await _read_upload(file, registry.limits.max_upload_bytes)
        try:
            voice, new = await run_in_threadpool(registry.put, name, data, file.filename or "", replace)
        except VoiceError as exc:
            raise ApiError(exc.status, str(exc), "name" if isinstance(exc, NAME_ERRORS) else "file") from None
        if not new:
            response.status_code = 200
        return _voice_json(voice)

    @app.delete("/v1/voices/{name}", tags=["voices"])
    async def delete_voice(name: str):
        try:
            await run_in_threadpool(registry.delete, name)
        except VoiceError as exc:
            raise ApiError(exc.status, str(exc), "name") from None
        return {"name": name, "object": "voice", "deleted": True}


# --- service ---------------------------------------------------------------------------------


def _service_routes(app: FastAPI, state: State) -> None:
    settings = state.settings

    @app.get("/health", tags=["service"])
    async def health():
        worker = state.worker
        return {"status": "draining" if state.draining or (worker and not worker.accepting) else "ok",
                "model": settings.model_name, "queue_depth": worker.depth if worker else 0,
                "max_batch": settings.max_batch, "batching": worker.batching if worker else settings.batching,
                "batching_note": worker.batching_note if worker else None,
                "formats": list(supported_formats()),
                "sample_rate": settings.sample_rate, "auth": bool(settings.api_key),
                "voices": len(state.registry)}

    @app.get("/v1/models", tags=["service"])
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "mvjax"}]}

    @app.get("/metrics", tags=["service"])
    async def metrics():
        if state.worker is not None:
            state.metrics.queue_depth.set(state.worker.depth)
            state.metrics.waiting_chunks.set(state.worker.waiting_chunks)
        body, kind = state.metrics.render()
        return Response(body, media_type=kind)

    @app.get("/", include_in_schema=False)
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise ApiError(404, "this installation has no web page")
        return FileResponse(index, media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")


__all__ = ["ApiError", "ServerSettings", "SpeechRequest", "create_app"]
