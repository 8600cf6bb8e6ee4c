"""The HTTP face of the speech server: a FastAPI app over one :class:`~mvjax.serve.worker.SpeechWorker`.

    app = create_app(tts, registry, ServerSettings())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``POST /v1/audio/speech`` (OpenAI-compatible, plus ``seed``, ``temperature``, ``top_p``,
``guidance_scale``, ``decoder``, ``enhance`` and ``stream``), ``GET /v1/audio/voices`` and
``GET|POST /v1/voices``, ``DELETE /v1/voices/{name}``, the reference server's ``POST /tts`` form
(without ``speaker_ref_path``: this server never opens a path or URL named in a request),
``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``/docs``, the web page at ``/``, and the
WebSocket ``/v1/audio/speech/stream`` (text in pieces, audio as it is made: :mod:`mvjax.serve.text_stream`).
The guard in front of them all (limits, API key, cross-site refusal, access log) is :mod:`mvjax.serve.guard`.

Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx
status; no traceback reaches a client (unexpected failures are logged and answered with 500).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, File, Form, Request, UploadFile, WebSocket
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from mvjax.audio.stream import supported_formats
from mvjax.inference.options import SamplingConfig
from mvjax.serve.errors import ApiError, install_errors
from mvjax.serve.guard import DOCS_ASSETS, install_middleware
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
from mvjax.serve.text_stream import PATH as SOCKET_PATH
from mvjax.serve.text_stream import serve_socket
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
NAME_ERRORS = (InvalidVoiceName, VoiceProtected, VoiceExists)  # upload refusals about the name, not the file


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
    install_middleware(app, state)
    install_errors(app)
    _speech_routes(app, state)
    _voice_routes(app, state)
    _service_routes(app, state)
    return app


def _on_batch(state: State):
    def record(stats):
        state.metrics.batch(stats)
        log.log(logging.INFO if state.settings.log_rounds else logging.DEBUG, "batch: %d chunks of %d requests (%d started), %d tokens, %.2f s "
                "(stage 1 %.2f s, streaming %.2f s)", stats.chunks, stats.utterances, stats.started, stats.tokens,
                stats.seconds, stats.stage1_seconds, stats.stream_seconds)

    return record


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

    @app.websocket(SOCKET_PATH)
    async def speech_stream(ws: WebSocket):
        """Text in pieces, audio as it is made (see :mod:`mvjax.serve.text_stream`)."""
        await serve_socket(state, ws)

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
                "devices": worker.devices if worker else None,
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
