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

import asyncio
import contextlib
import hmac
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mvjax.audio.stream import (
    StreamEncoder,
    content_type,
    encode,
    streams_incrementally,
    supported_formats,
)
from mvjax.core.errors import MvjaxError
from mvjax.inference.options import SynthesisError, normalised_texts
from mvjax.serve.metrics import Metrics
from mvjax.serve.output import EnhancerPool, StreamAssembler, finish_whole
from mvjax.serve.settings import ServerSettings
from mvjax.serve.voices import VoiceError, VoiceRegistry
from mvjax.serve.worker import ChunkAudio, Job, SpeechParams, SpeechWorker, WorkerError

log = logging.getLogger("mvjax.serve")
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/health", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/favicon.ico")
UPLOAD_PATHS = ("/v1/voices", "/tts")
MAX_SEED = 2**32 - 1


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a one-line ``message``, the request field at fault."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers, self.code = status, message, param, headers, code


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, headers=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class SpeechRequest(BaseModel):
    """``POST /v1/audio/speech``: OpenAI's fields and mvjax's extensions."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field("metavoice-1b", description="any name: this server serves one model")
    input: StrictStr = Field(..., description="the text to speak (English)")
    voice: StrictStr = Field(..., description="a voice name from GET /v1/audio/voices")
    response_format: Optional[StrictStr] = Field(None, description="wav | pcm | flac | mp3 | opus (see /health)")
    speed: Optional[StrictFloat | StrictInt] = Field(1.0, description="only 1.0: MetaVoice has no rate control")
    instructions: Optional[StrictStr] = Field(None, description="not supported (must be empty)")
    stream_format: Optional[Literal["audio"]] = Field(None, description="only 'audio' (server-sent events are not offered)")
    stream: StrictBool = Field(False, description="send audio as each chunk is ready (wav, pcm or opus)")
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED, description="default: a random seed (X-Seed header)")
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0, le=5, description="first-stage temperature; 0 = greedy")
    top_p: StrictFloat | StrictInt = Field(0.95, gt=0, le=1, description="nucleus sampling")
    guidance_scale: StrictFloat | StrictInt = Field(3.0, ge=0, le=10, description="classifier-free guidance")
    decoder: Optional[Literal["mbd", "encodec"]] = Field(None, description="multi-band diffusion or the plain codec")
    enhance: Optional[StrictBool] = Field(None, description="DeepFilterNet3 on the output")


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
        state.worker = SpeechWorker(tts, settings.max_batch, settings.max_queue, on_batch=_on_batch(state),
                                    on_drop=lambda job, error: metrics.dropped.labels(type(error).__name__).inc(),
                                    max_new_tokens=settings.max_new_tokens)
        try:
            yield
        finally:
            state.draining = True
            await run_in_threadpool(state.worker.drain, settings.timeout_s)
            state.worker.close()
            state.pool.close()

    app = FastAPI(title="mvjax speech server", version="0.1.0", lifespan=lifespan,
                  description="MetaVoice-1B text to speech on mvjax: an OpenAI-compatible API, voices, streaming.")
    app.state.mvjax = state
    _install_middleware(app, state)
    _install_errors(app)
    _speech_routes(app, state)
    _voice_routes(app, state)
    _service_routes(app, state)
    return app


def _on_batch(state: State):
    def record(stats):
        state.metrics.batch(stats)
        log.info("batch: %d chunks of %d requests, %d tokens, %.2f s (stage 1 %.2f s)", stats.chunks, stats.jobs,
                 stats.tokens, stats.seconds, stats.stage1_seconds)

    return record


# --- middleware: body limits, auth, access log, CORS ----------------------------------------


def _install_middleware(app: FastAPI, state: State) -> None:
    settings = state.settings

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.monotonic()
        path = request.url.path
        limit = settings.max_upload_body if path in UPLOAD_PATHS else settings.max_json_bytes
        status = 500
        try:
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                response = error_response(413, f"the request body is over the limit of {limit} bytes")
            elif settings.api_key and not _open(path) and not _authorised(request, settings.api_key):
                response = error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                          headers={"WWW-Authenticate": "Bearer"})
            elif state.draining and request.method != "GET":
                response = error_response(503, "the server is shutting down; try another instance",
                                          headers={"Retry-After": "5", "Connection": "close"})
            else:
                response = await call_next(request)
            status = response.status_code
            return response
        except Exception:  # call_next re-raises what no handler caught
            log.exception("unhandled error on %s %s", request.method, path)
            return error_response(500, "internal server error")
        finally:
            route = path if path in _ROUTES else ("/v1/voices/{name}" if path.startswith("/v1/voices/") else "other")
            state.metrics.requests.labels(route, str(status)).inc()
            log.info("%s %s %d %.0f ms", request.method, path, status, (time.monotonic() - start) * 1000)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Seed", "X-Sample-Rate", "X-Time-To-First-Audio"])


_ROUTES = {"/", "/health", "/metrics", "/v1/audio/speech", "/v1/audio/voices", "/v1/voices", "/v1/models", "/tts"}


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def _authorised(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.headers, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "form")]
        param = loc[0] if loc else None  # the request's fields are flat; later parts name union members
        kind = first.get("type", "")
        if kind == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif kind == "extra_forbidden":
            message = f"unknown field {param!r}"
        elif kind == "missing":
            message = f"{param} is required"
        elif kind in ("model_attributes_type", "dict_type"):
            message = "the request body must be a JSON object"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error")


# --- speech ----------------------------------------------------------------------------------


def _check_speech(req: SpeechRequest, settings: ServerSettings) -> tuple[str, bool]:
    """(response format, enhance) after the checks pydantic cannot express."""
    fmt = (req.response_format or settings.response_format).lower()
    if fmt not in supported_formats():
        raise ApiError(400, f"response_format {req.response_format!r} is not supported here; "
                       f"supported: {', '.join(supported_formats())}", "response_format")
    if req.speed is not None and not math.isclose(float(req.speed), 1.0):
        raise ApiError(400, f"speed {req.speed} is not supported: MetaVoice has no speaking-rate control "
                       "(only 1.0)", "speed")
    if req.instructions:
        raise ApiError(400, "instructions are not supported: MetaVoice takes the style from the voice", "instructions")
    if req.stream and not streams_incrementally(fmt):
        incremental = [f for f in supported_formats() if streams_incrementally(f)]
        raise ApiError(400, f"response_format {fmt!r} cannot be streamed; stream wav, pcm or opus "
                       f"({', '.join(incremental)} here)", "response_format")
    if len(req.input) > settings.max_input_chars:
        raise ApiError(400, f"input is {len(req.input)} characters; the limit is {settings.max_input_chars}", "input")
    if not req.input.strip():
        raise ApiError(400, "input is empty", "input")
    enhance = settings.enhance if req.enhance is None else req.enhance
    return fmt, enhance


def _voice(state: State, name: str, param: str = "voice") -> np.ndarray:
    try:
        return state.registry.get(name)
    except VoiceError:
        names = sorted(v.name for v in state.registry.list())
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise ApiError(400, f"unknown voice {name[:64]!r}; voices: {shown or 'none (upload one to /v1/voices)'}",
                       param) from None


def _plan(tts, text: str) -> list[str]:
    """Chunks at the speaking rate (a ``max_new_tokens`` cap only bounds the work per chunk)."""
    try:
        (normalised,) = normalised_texts([text])
        return tts.plan(normalised)
    except SynthesisError as exc:
        raise ApiError(400, f"input: {exc}", "input") from None


class _Waiter:
    """Await a job's events from the event loop (the worker thread pokes an asyncio.Event)."""

    def __init__(self):
        loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.notify = lambda: loop.call_soon_threadsafe(self.event.set)

    async def next(self, job: Job, request: Request, deadline: float):
        while True:
            event = job.poll()
            if event is not Job.EMPTY:
                return event
            self.event.clear()
            event = job.poll()
            if event is not Job.EMPTY:
                return event
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.event.wait(), 0.25)
            if await request.is_disconnected():
                job.cancel()
                raise ApiError(499, "the client went away")
            if time.monotonic() > deadline + 5:
                job.cancel()
                raise ApiError(504, "the request did not finish within the server's time limit")


async def _submit(state: State, pieces: list[str], embedding, params: SpeechParams, waiter: _Waiter) -> Job:
    job = Job(pieces, embedding, params, time.monotonic() + state.settings.timeout_s, notify=waiter.notify)
    try:
        state.worker.submit(job)
    except WorkerError as exc:
        raise ApiError(exc.status, str(exc), headers={"Retry-After": str(state.worker.retry_after())}) from None
    state.metrics.queue_depth.set(state.worker.depth)
    state.metrics.waiting_chunks.set(state.worker.waiting_chunks)
    return job


def _worker_error(exc: WorkerError) -> ApiError:
    return ApiError(exc.status if exc.status != 499 else 500, str(exc))


async def speak(state: State, request: Request, text: str, embedding, params: SpeechParams, fmt: str, enhance: bool,
                stream: bool) -> Response:
    """Queue a job and answer with its audio, whole or streamed."""
    settings, metrics = state.settings, state.metrics
    arrived = time.monotonic()
    pieces = await run_in_threadpool(_plan, state.tts, text)
    waiter = _Waiter()
    job = await _submit(state, pieces, embedding, params, waiter)
    rate = settings.sample_rate
    headers = {"X-Seed": str(params.seed), "X-Sample-Rate": str(rate)}
    codec_rate = state.tts.sample_rate
    if settings.log_text:
        log.info("job %d: %d chunks, voice text %r", job.id, len(pieces), text)
    else:
        log.info("job %d: %d characters in %d chunks, seed %d, %s%s", job.id, len(text), len(pieces), params.seed,
                 fmt, " (stream)" if stream else "")
    try:
        first = await waiter.next(job, request, job.deadline)
    except BaseException:
        job.cancel()
        raise
    if isinstance(first, WorkerError):
        raise _worker_error(first)
    ttfa = time.monotonic() - arrived
    metrics.ttfa.observe(ttfa)
    headers["X-Time-To-First-Audio"] = f"{ttfa:.3f}"
    log.info("job %d: first audio after %.2f s", job.id, ttfa)

    if not stream:
        pieces_audio = [first.wav]
        try:
            while True:
                event = await waiter.next(job, request, job.deadline)
                if event is None:
                    break
                if isinstance(event, WorkerError):
                    raise _worker_error(event)
                pieces_audio.append(event.wav)
        except BaseException:
            job.cancel()
            raise
        audio = await run_in_threadpool(finish_whole, pieces_audio, codec_rate, settings.normalize, enhance,
                                        state.pool, rate)
        body = await run_in_threadpool(encode, audio, rate, fmt)
        metrics.latency.observe(time.monotonic() - arrived)
        metrics.audio_seconds.inc(audio.shape[0] / rate)
        return Response(body, media_type=content_type(fmt, rate), headers=headers)

    encoder = StreamEncoder(fmt, rate)
    assembler = StreamAssembler(codec_rate, settings.normalize, enhance, state.pool, rate)

    async def body():
        sent = 0
        complete = False
        try:
            await run_in_threadpool(assembler.__enter__)
            yield encoder.header()
            event: object = first
            while True:
                if isinstance(event, ChunkAudio):
                    audio = await run_in_threadpool(assembler.add, event.wav)
                    sent += audio.shape[0]
                    data = encoder.chunk(audio)
                    if data:
                        yield data
                elif isinstance(event, WorkerError):
                    log.warning("job %d: stream cut short: %s", job.id, event)
                    return
                else:  # None: the job is over
                    break
                event = await waiter.next(job, request, job.deadline)
            tail = await run_in_threadpool(assembler.end)
            sent += tail.shape[0]
            yield encoder.chunk(tail) + encoder.end()
            complete = True
        except ApiError as exc:
            log.info("job %d: stream stopped: %s", job.id, exc.message)
        finally:
            job.cancel()  # no-op when finished; otherwise its remaining chunks are not computed
            await run_in_threadpool(assembler.__exit__, None, None, None)
            if complete:
                metrics.latency.observe(time.monotonic() - arrived)
                metrics.audio_seconds.inc(sent / rate)
            log.info("job %d: streamed %.2f s of audio%s", job.id, sent / rate, "" if complete else " (cut short)")

    return StreamingResponse(body(), media_type=content_type(fmt, rate), headers=headers)


def _seed(seed: Optional[int]) -> int:
    return secrets.randbelow(MAX_SEED + 1) if seed is None else int(seed)


def _speech_routes(app: FastAPI, state: State) -> None:
    settings = state.settings

    @app.post("/v1/audio/speech", response_class=Response, tags=["speech"],
              responses={200: {"content": {"audio/mpeg": {}, "audio/wav": {}, "audio/pcm": {}}}})
    async def create_speech(req: SpeechRequest, request: Request):
        """Text to speech, OpenAI-compatible. ``stream: true`` sends audio as each chunk of the
        text is ready (chunked transfer; wav with a streaming header, raw pcm, or opus)."""
        fmt, enhance = _check_speech(req, settings)
        embedding = _voice(state, req.voice)
        params = SpeechParams(seed=_seed(req.seed), temperature=float(req.temperature), top_p=float(req.top_p),
                              guidance=float(req.guidance_scale), decoder=req.decoder or settings.decoder)
        return await speak(state, request, req.input, embedding, params, fmt, enhance, req.stream)

    @app.post("/tts", response_class=Response, tags=["speech"],
              responses={200: {"content": {"audio/wav": {}}}})
    async def reference_tts(
        request: Request,
        text: str = Form(..., description="text to speak"),
        audiodata: Optional[UploadFile] = File(None, description="a recording of the reference speaker"),
        voice: Optional[str] = Form(None, description="or: a registered voice name"),
        guidance: float = Form(3.0, ge=0.0, le=5.0),
        top_p: float = Form(0.95, ge=0.0, le=1.0),
        seed: Optional[int] = Form(None, ge=0, le=MAX_SEED),
        speaker_ref_path: Optional[str] = Form(None, description="refused: this server never opens paths or URLs"),
    ):
        """The reference server's form API (drop-in), answering with WAV. The speaker comes from
        the uploaded ``audiodata`` (or a registered ``voice``); ``speaker_ref_path`` is refused."""
        if speaker_ref_path:
            raise ApiError(400, "speaker_ref_path is not supported: this server never opens a path or URL named in "
                           "a request; upload the recording as audiodata", "speaker_ref_path")
        if len(text) > settings.max_input_chars:
            raise ApiError(400, f"text is {len(text)} characters; the limit is {settings.max_input_chars}", "text")
        if not text.strip():
            raise ApiError(400, "text is empty", "text")
        if audiodata is not None and audiodata.filename:
            data = await _read_upload(audiodata, settings.voice_limits.max_upload_bytes)
            try:
                embedding = await run_in_threadpool(state.registry.embed_upload, data, audiodata.filename or "")
            except VoiceError as exc:
                raise ApiError(exc.status, str(exc), "audiodata") from None
        elif voice:
            embedding = _voice(state, voice)
        else:
            raise ApiError(400, "upload the reference speaker as audiodata (or name a registered voice)", "audiodata")
        params = SpeechParams(seed=_seed(seed), guidance=guidance, top_p=top_p if top_p > 0 else None,
                              decoder=settings.decoder)
        return await speak(state, request, text, embedding, params, "wav", settings.enhance, stream=False)


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

    @app.post("/v1/voices", status_code=201, tags=["voices"])
    async def add_voice(name: str = Form(..., description="1-64 of [A-Za-z0-9_.-]"),
                        file: UploadFile = File(..., description="a recording of the voice (wav, flac, ogg, mp3)"),
                        replace: bool = Form(False)):
        """Add a voice from a recording: its speaker embedding is stored under ``name``."""
        data = await _read_upload(file, registry.limits.max_upload_bytes)
        try:
            voice = await run_in_threadpool(registry.add, name, data, file.filename or "", replace)
        except VoiceError as exc:
            raise ApiError(exc.status, str(exc), "name" if exc.status in (403, 409) else "file") from None
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
                "max_batch": settings.max_batch, "formats": list(supported_formats()),
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


__all__ = ["ApiError", "ServerSettings", "SpeechRequest", "create_app", "MvjaxError"]
