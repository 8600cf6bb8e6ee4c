"""Speech requests: the OpenAI-compatible request, its checks, and the answer (whole or streamed).

:func:`speak` plans the text into chunks, queues a :class:`~mvjax.serve.jobs.Job`, waits for its
chunks on the event loop (the worker thread wakes it) and answers: a whole response finished as
the library finishes a text, or a stream that sends each chunk as it is ready. A client that goes
away cancels its job, so chunks not yet started are never computed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import math
import secrets
import time
from typing import Awaitable, Callable, Literal, Optional

import numpy as np
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
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

from mvjax.audio.finish import StreamAssembler, finish_whole
from mvjax.audio.stream import (
    StreamEncoder,
    content_type,
    encode,
    streams_incrementally,
    supported_formats,
)
from mvjax.inference.options import (
    DECODERS,
    MAX_SEED,
    SamplingConfig,
    StreamSettings,
    SynthesisError,
    normalised_texts,
)
from mvjax.inference.scheduler import Utterance
from mvjax.serve.errors import ApiError
from mvjax.serve.jobs import ChunkAudio, Job, WorkerError
from mvjax.serve.settings import ServerSettings
from mvjax.serve.voices import VoiceError

log = logging.getLogger("mvjax.serve")
STREAM_DEFAULTS = StreamSettings()


def sampling_field(name: str):
    """A request model's field for first-stage sampling value ``name``: default, bounds and meaning
    from :class:`~mvjax.inference.options.SamplingConfig`."""
    spec = SamplingConfig.spec(name)
    low = {"gt": spec.low} if spec.low_open else {"ge": spec.low}
    return Field(spec.default, le=spec.high, description=spec.help, **low)


class SpeechOptions(BaseModel):
    """How to speak (every field of a speech request but its text): OpenAI's fields and mvjax's extensions.
    The WebSocket's start message has them too."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field("metavoice-1b", description="any name: this server serves one model")
    voice: StrictStr = Field(..., description="a voice name from GET /v1/audio/voices")
    response_format: Optional[StrictStr] = Field(None, description="wav | pcm | flac | mp3 | opus (see /health)")
    speed: Optional[StrictFloat | StrictInt] = Field(1.0, description="only 1.0: MetaVoice has no rate control")
    instructions: Optional[StrictStr] = Field(None, description="not supported (must be empty)")
    stream_format: Optional[Literal["audio", "sse"]] = Field(
        None, description="'audio': the audio bytes as they are made; 'sse': server-sent events "
        "(speech.audio.delta with base64 audio, then speech.audio.done); either one streams")
    stream: StrictBool = Field(False, description="send audio as it is made (wav, pcm or opus)")
    stream_chunk_frames: Optional[StrictInt] = Field(
        None, ge=1, le=4096, description=f"streaming: audio every N codec frames (75 per second; default "
        f"{STREAM_DEFAULTS.frames})")
    stream_lookahead: Optional[StrictInt] = Field(
        None, ge=-1, le=4096, description=f"streaming: frames the second stage sees past those it sends (default "
        f"{STREAM_DEFAULTS.lookahead}; -1: whole chunks only, the codes of a whole answer)")
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED, description="default: a random seed (X-Seed header)")
    temperature: StrictFloat | StrictInt = sampling_field("temperature")
    top_p: StrictFloat | StrictInt = sampling_field("top_p")
    guidance_scale: StrictFloat | StrictInt = sampling_field("guidance_scale")
    decoder: Optional[Literal[DECODERS]] = Field(None, description="multi-band diffusion or the plain codec")
    enhance: Optional[StrictBool] = Field(None, description="DeepFilterNet3 on the output")


class SpeechRequest(SpeechOptions):
    """``POST /v1/audio/speech``: the text and how to speak it."""

    input: StrictStr = Field(..., description="the text to speak (English)")


# --- speech ----------------------------------------------------------------------------------


STREAM_SSE = "sse"


@dataclasses.dataclass(frozen=True)
class SpeechTask:
    """One checked speech request: what to say (``text``, normalised), in which voice, how to sample,
    and how to answer (format, enhancement, streamed or whole)."""

    text: str
    embedding: np.ndarray
    seed: int
    sampling: SamplingConfig
    decoder: str
    fmt: str
    enhance: bool
    stream: bool = False
    voice: Optional[str] = None  # the voice's name, for the log line
    streaming: Optional[StreamSettings] = None  # audio within a chunk (streams only)
    sse: bool = False  # server-sent events (OpenAI's stream_format "sse") instead of raw audio bytes


def check_speech(req: SpeechRequest, settings: ServerSettings) -> tuple[str, bool, str]:
    """(response format, enhance, normalised text) after the checks pydantic cannot express."""
    fmt, enhance = check_options(req, settings, req.stream or req.stream_format == STREAM_SSE)
    return fmt, enhance, check_text(req.input, settings)


def check_options(req: SpeechOptions, settings: ServerSettings, stream: bool,
                  default_format: Optional[str] = None) -> tuple[str, bool]:
    """(response format, enhance) after the checks pydantic cannot express; ``stream``: the audio is
    streamed (so its format must stream); ``default_format``: instead of the server's."""
    fmt = (req.response_format or default_format or settings.response_format).lower()
    if fmt not in supported_formats():
        raise ApiError(400, f"response_format {req.response_format!r} is not supported here; "
                       f"supported: {', '.join(supported_formats())}", "response_format")
    if req.speed is not None and not math.isclose(float(req.speed), 1.0):
        raise ApiError(400, f"speed {req.speed} is not supported: MetaVoice has no speaking-rate control "
                       "(only 1.0)", "speed")
    if req.instructions:
        raise ApiError(400, "instructions are not supported: MetaVoice takes the style from the voice", "instructions")
    if stream and not streams_incrementally(fmt):
        incremental = [f for f in supported_formats() if streams_incrementally(f)]
        raise ApiError(400, f"response_format {fmt!r} cannot be streamed; stream wav, pcm or opus "
                       f"({', '.join(incremental)} here)", "response_format")
    return fmt, settings.enhance if req.enhance is None else req.enhance


def streaming_of(req: SpeechOptions, stream: Optional[bool] = None) -> Optional[StreamSettings]:
    """The request's streaming within a chunk (None for a whole answer); ``stream``: whether it streams,
    when not from its ``stream`` and ``stream_format`` fields."""
    if not (stream if stream is not None else req.stream or req.stream_format == STREAM_SSE):
        return None
    lookahead = STREAM_DEFAULTS.lookahead if req.stream_lookahead is None else req.stream_lookahead
    try:
        return StreamSettings(frames=req.stream_chunk_frames or STREAM_DEFAULTS.frames,
                              first_frames=STREAM_DEFAULTS.first_frames, lookahead=None if lookahead < 0 else lookahead)
    except SynthesisError as exc:
        raise ApiError(400, str(exc), "stream_chunk_frames" if exc.option == "frames" else "stream_lookahead") from None


def check_text(text: str, settings: ServerSettings, param: str = "input") -> str:
    """The text to speak, normalised: within the length limit, not empty, and free of characters the
    model cannot read (outside Latin-1, control characters); a 400 naming ``param`` otherwise."""
    if len(text) > settings.max_input_chars:
        raise ApiError(400, f"{param} is {len(text)} characters; the limit is {settings.max_input_chars}", param)
    if not text.strip():
        raise ApiError(400, f"{param} is empty", param)
    try:
        (normalised,) = normalised_texts([text])
    except SynthesisError as exc:
        raise ApiError(400, f"{param}: {exc}", param) from None
    return normalised


def sampling_of(param: str, **values) -> SamplingConfig:
    """The first-stage sampling a request asks for; a 400 naming the field when out of range."""
    try:
        return SamplingConfig(**values)
    except SynthesisError as exc:
        raise ApiError(400, str(exc), exc.option or param) from None


def voice_embedding(state, name: str, param: str = "voice") -> np.ndarray:
    try:
        return state.registry.get(name)
    except VoiceError:
        names = sorted(v.name for v in state.registry.list())
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise ApiError(400, f"unknown voice {name[:64]!r}; voices: {shown or 'none (upload one to /v1/voices)'}",
                       param) from None


def plan_text(tts, text: str, param: str = "input") -> list[str]:
    """Chunks of normalised ``text`` at the speaking rate (a ``max_new_tokens`` cap only bounds the work per chunk)."""
    try:
        return tts.plan(text)
    except SynthesisError as exc:
        raise ApiError(400, f"{param}: {exc}", param) from None


Gone = Callable[[], Awaitable[bool]]  # whether the client went away (e.g. an HTTP request's is_disconnected)


class Waiter:
    """Await a job's events from the event loop (the worker thread pokes an asyncio.Event)."""

    def __init__(self):
        loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.notify = lambda: loop.call_soon_threadsafe(self.event.set)

    async def next(self, job: Job, gone: Gone, deadline: float):
        """The job's next event; ApiError 499 (and the job cancelled) once ``gone()``, 504 past ``deadline``."""
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
            if await gone():
                job.cancel()
                raise ApiError(499, "the client went away")
            if time.monotonic() > deadline + 5:
                job.cancel()
                raise ApiError(504, "the request did not finish within the server's time limit")


async def _submit(state, task: SpeechTask, waiter: Waiter) -> Job:
    pieces = await run_in_threadpool(plan_text, state.tts, task.text)
    utterance = Utterance.seeded(pieces, task.embedding, task.seed, sampling=task.sampling, decoder=task.decoder,
                                 stream=task.stream, streaming=task.streaming)
    job = Job(utterance, task.seed, time.monotonic() + state.settings.timeout_s, notify=waiter.notify, voice=task.voice)
    try:
        state.worker.submit(job)
    except WorkerError as exc:
        raise ApiError(exc.status, str(exc), headers={"Retry-After": str(state.worker.retry_after())}) from None
    state.metrics.queue_depth.set(state.worker.depth)
    state.metrics.waiting_chunks.set(state.worker.waiting_chunks)
    return job


def worker_error(exc: WorkerError) -> ApiError:
    return ApiError(exc.status if exc.status != 499 else 500, str(exc))


async def speak(state, request: Request, task: SpeechTask) -> Response:
    """Queue a job and answer with its audio, whole or streamed. The job goes into the request's state,
    where the access log line finds it."""
    settings, metrics = state.settings, state.metrics
    arrived = time.monotonic()
    waiter = Waiter()
    job = await _submit(state, task, waiter)
    request.state.job = job
    fmt, enhance, stream = task.fmt, task.enhance, task.stream
    rate = settings.sample_rate
    headers = {"X-Seed": str(task.seed), "X-Sample-Rate": str(rate)}
    codec_rate = state.tts.sample_rate
    log.debug("job %d: %d characters in %d chunks, seed %d, %s%s", job.id, len(task.text), len(job.pieces), task.seed,
              fmt, " (stream)" if stream else "")
    try:
        first = await waiter.next(job, request.is_disconnected, job.deadline)
    except BaseException:
        job.cancel()
        raise
    if isinstance(first, WorkerError):
        raise worker_error(first)
    ttfa = time.monotonic() - arrived
    metrics.ttfa.observe(ttfa)
    headers["X-Time-To-First-Audio"] = f"{ttfa:.3f}"
    log.debug("job %d: first audio after %.2f s", job.id, ttfa)

    if not stream:
        pieces_audio = [first.wav]
        try:
            while True:
                event = await waiter.next(job, request.is_disconnected, job.deadline)
                if event is None:
                    break
                if isinstance(event, WorkerError):
                    raise worker_error(event)
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

    audio_stream = AudioStream(state, job, waiter, request.is_disconnected, fmt, enhance)

    async def body():
        try:
            async with contextlib.aclosing(audio_stream.chunks(first)) as chunks:
                async for data in chunks:
                    yield data
            if audio_stream.error is not None:
                log.warning("job %d: stream cut short: %s", job.id, audio_stream.error)
        except ApiError as exc:
            log.debug("job %d: stream stopped: %s", job.id, exc.message)
        finally:
            sent, complete = audio_stream.samples, audio_stream.complete
            if complete:
                metrics.latency.observe(time.monotonic() - arrived)
                metrics.audio_seconds.inc(sent / rate)
            log.debug("job %d: streamed %.2f s of audio%s", job.id, sent / rate, "" if complete else " (cut short)")

    if task.sse:
        return StreamingResponse(sse_events(body(), job), media_type="text/event-stream", headers=headers)
    return StreamingResponse(body(), media_type=content_type(fmt, rate), headers=headers)


class AudioStream:
    """A streamed job's audio as encoded bytes while it is made (:meth:`chunks`: the format's header
    first), its chunks joined, loudness and enhancement as the server's settings say. ``gone``: whether
    the client went away. After the iteration: ``samples`` sent, ``complete`` (the job's audio all
    went out), ``error`` (the WorkerError that cut it short, if one did), ``first_audio`` (when the
    first audio bytes were handed out, time.monotonic)."""

    def __init__(self, state, job: Job, waiter: Waiter, gone: Gone, fmt: str, enhance: bool):
        settings = state.settings
        self.job, self.waiter, self.gone = job, waiter, gone
        self.rate = settings.sample_rate
        self.encoder = StreamEncoder(fmt, self.rate)
        self.assembler = StreamAssembler(state.tts.sample_rate, settings.normalize, enhance, state.pool, self.rate)
        self.samples = 0
        self.complete = False
        self.error: Optional[WorkerError] = None
        self.first_audio: Optional[float] = None

    async def chunks(self, first=Job.EMPTY):
        """The bytes to send, as they are ready; ``first``: the job's first event when the caller already
        has it. Raises ApiError when the client is gone or the deadline passed; the job is cancelled
        when this ends before it is over (its remaining chunks are not computed)."""
        job, waiter, encoder, assembler = self.job, self.waiter, self.encoder, self.assembler
        try:
            await run_in_threadpool(assembler.__enter__)
            yield encoder.header()
            event = first if first is not Job.EMPTY else await waiter.next(job, self.gone, job.deadline)
            while True:
                if isinstance(event, ChunkAudio):
                    audio = await run_in_threadpool(assembler.add, event.wav, event.continues)
                    self.samples += audio.shape[0]
                    data = encoder.chunk(audio)
                    if data:
                        if self.first_audio is None:
                            self.first_audio = time.monotonic()
                        yield data
                elif isinstance(event, WorkerError):
                    self.error = event
                    return
                else:  # None: the job is over
                    break
                event = await waiter.next(job, self.gone, job.deadline)
            tail = await run_in_threadpool(assembler.end)
            self.samples += tail.shape[0]
            yield encoder.chunk(tail) + encoder.end()
            self.complete = True
        finally:
            job.cancel()  # no-op when finished; otherwise its remaining chunks are not computed
            assembler.__exit__(None, None, None)  # not awaited: this may run while being cancelled


async def sse_events(audio, job: Job):
    """OpenAI's speech events around a stream of audio bytes: ``speech.audio.delta`` (base64 audio) per
    piece, then ``speech.audio.done`` with the usage (input characters and first-stage tokens)."""
    async for data in audio:
        if data:
            yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': base64.b64encode(data).decode()})}\n\n"
    if job.done and job.error is None:
        chars = sum(len(p) for p in job.pieces)
        usage = {"input_tokens": chars, "output_tokens": job.tokens, "total_tokens": chars + job.tokens}
        yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n"


def random_or(seed: Optional[int]) -> int:
    return secrets.randbelow(MAX_SEED + 1) if seed is None else int(seed)
