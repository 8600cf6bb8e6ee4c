"""The WebSocket text-in stream, ``/v1/audio/speech/stream``: text arrives in pieces (an LLM's tokens, say),
audio leaves as it is made.

The client sends JSON text frames: ``{"type": "start", ...}`` with the speech request's fields but
``input`` (:class:`~mvjax.serve.speech.SpeechOptions`: voice, response_format (wav, pcm or opus:
formats that stream; default the server's when it streams, else pcm), seed, sampling, decoder,
enhance, stream_chunk_frames, stream_lookahead), then any number of ``{"type": "text", "text": ...}``,
then ``{"type": "end"}``. The server answers ``{"type": "started", "seed", "sample_rate",
"response_format"}``, sends the audio as binary frames (the format's stream, header first, as
``stream: true`` over HTTP sends it), then ``{"type": "audio.done", ...}`` (samples, seconds, chunks, time
to first audio, usage) and closes with 1000.

Text is kept until sentences complete (:func:`mvjax.inference.longform.complete_sentences`); the
complete ones are normalised, planned into chunks as one text, and added to the session's job, an
open :class:`~mvjax.inference.scheduler.Utterance` that the worker speaks chunk by chunk, so audio
starts while the client is still sending. Sentences planned apart are spoken as separate chunks,
where a whole text given at once may pack several into one chunk.

A refusal or failure is a ``{"type": "error", "message", "param", "status"}`` frame (``status``: the
HTTP status the same refusal gets over HTTP), then a close with a reason: 1008 (a bad or unexpected
message, an unknown voice, past the session's time limit), 1009 (a message over the JSON body limit,
text over the input limit in all), 1011 (a server error), 1013 (busy or draining: try later). A
client that goes away cancels its job (the worker's ``dropped`` metric counts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Literal, Optional

from fastapi import WebSocket
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from mvjax.audio.stream import streams_incrementally
from mvjax.inference.longform import complete_sentences
from mvjax.inference.scheduler import Utterance
from mvjax.serve.errors import ApiError, loggable, validation_message
from mvjax.serve.jobs import Job, WorkerError
from mvjax.serve.speech import (
    STREAM_SSE,
    AudioStream,
    SpeechOptions,
    Waiter,
    check_options,
    check_text,
    plan_text,
    random_or,
    sampling_of,
    streaming_of,
    voice_embedding,
    worker_error,
)

log = logging.getLogger("mvjax.serve")
PATH = "/v1/audio/speech/stream"
NORMAL, POLICY, TOO_BIG, SERVER_ERROR, TRY_LATER = 1000, 1008, 1009, 1011, 1013
REASON_BYTES = 123  # the most a close frame's reason may hold


def close_code(status: int) -> int:
    """The WebSocket close code for a refusal the HTTP API answers with ``status``."""
    if status == 413:
        return TOO_BIG
    if status == 503:
        return TRY_LATER
    if status >= 500 and status != 504:
        return SERVER_ERROR
    return POLICY


def error_event(status: int, message: str, param: Optional[str] = None) -> str:
    return json.dumps({"type": "error", "message": message, "param": param, "status": status})


def close_reason(message: str) -> str:
    """``message`` cut to what a close frame holds (at most 123 bytes of UTF-8)."""
    data = message.encode()
    return message if len(data) <= REASON_BYTES else data[:REASON_BYTES - 3].decode(errors="ignore") + "..."


class StartMessage(SpeechOptions):
    """``{"type": "start", ...}``: how to speak the text that follows."""

    type: Literal["start"]


class TextMessage(BaseModel):
    """``{"type": "text", "text": ...}``: more text (any piece: a word, a token, sentences)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class EndMessage(BaseModel):
    """``{"type": "end"}``: no more text."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["end"]


class ClientGone(Exception):
    """The client closed the socket or vanished."""


def parse(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, *validation_message(exc.errors(), "a message")) from None


class Session:
    """One WebSocket client's speech: its start message, its job (an open utterance) and the text it sends."""

    def __init__(self, state, ws: WebSocket):
        self.state, self.ws, self.settings = state, ws, state.settings
        self.buffer = ""  # text received and not planned yet (an unfinished sentence)
        self.received = 0  # characters of text received in all
        self.chunks = 0  # chunks planned
        self.job: Optional[Job] = None
        self.stream: Optional[AudioStream] = None
        self.first_text: Optional[float] = None  # when the first sentence went to the worker

    async def message(self) -> dict:
        """The client's next message, a JSON object with a ``type``; ClientGone when it left."""
        try:
            message = await self.ws.receive()
        except WebSocketDisconnect:
            raise ClientGone from None
        if message["type"] == "websocket.disconnect":
            raise ClientGone
        text, limit = message.get("text"), self.settings.max_json_bytes
        if text is None:
            raise ApiError(400, "send JSON text frames, not binary ones")
        if len(text) > limit or len(text.encode(errors="surrogatepass")) > limit:
            raise ApiError(413, f"a message is over the limit of {limit} bytes")
        try:
            data = json.loads(text)
        except ValueError:
            raise ApiError(400, "a message is not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise ApiError(400, 'a message must be a JSON object with a "type" (start, text or end)', "type")
        return data

    async def begin(self) -> None:
        """Read the start message and queue the session's job (open for text)."""
        try:
            data = await asyncio.wait_for(self.message(), self.settings.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "no start message within the server's time limit") from None
        if data["type"] != "start":
            raise ApiError(400, f'the first message must be {{"type": "start", ...}}, not '
                                f'{loggable(data["type"], 40)!r}', "type")
        start = parse(StartMessage, data)
        if start.stream_format == STREAM_SSE or ("stream" in start.model_fields_set and not start.stream):
            field = "stream_format" if start.stream_format == STREAM_SSE else "stream"
            raise ApiError(400, "a WebSocket always streams audio as binary frames", field)
        state, settings = self.state, self.settings
        default = settings.response_format if streams_incrementally(settings.response_format) else "pcm"
        fmt, enhance = check_options(start, settings, True, default)
        embedding = voice_embedding(state, start.voice)
        sampling = sampling_of("start", temperature=float(start.temperature), top_p=float(start.top_p),
                               guidance_scale=float(start.guidance_scale))
        seed = random_or(start.seed)
        utterance = Utterance.seeded([], embedding, seed, sampling=sampling, decoder=start.decoder or settings.decoder,
                                     stream=True, streaming=streaming_of(start, True), open=True)
        self.waiter = Waiter()
        job = Job(utterance, seed, time.monotonic() + settings.timeout_s, notify=self.waiter.notify, voice=start.voice)
        try:
            state.worker.submit(job)
        except WorkerError as exc:
            raise ApiError(exc.status, str(exc)) from None
        self.job = self.ws.state.job = job
        state.metrics.queue_depth.set(state.worker.depth)
        self.stream = AudioStream(state, job, self.waiter, self.reader_gone, fmt, enhance)
        await self.ws.send_text(json.dumps({"type": "started", "seed": seed, "sample_rate": settings.sample_rate,
                                            "response_format": fmt}))
        log.debug("job %d: WebSocket stream, seed %d, %s", job.id, seed, fmt)

    async def reader_gone(self) -> bool:
        return self.reader.done()

    async def read_text(self) -> None:
        """Take the client's text until it ends, then watch for it leaving; raises ClientGone or ApiError."""
        ended = False
        while True:
            data = await self.message()
            kind = data["type"]
            if ended:
                raise ApiError(400, f"no message may follow end (got {loggable(kind, 40)!r})", "type")
            if kind == "text":
                await self.add(parse(TextMessage, data).text)
            elif kind == "end":
                parse(EndMessage, data)
                await self.end()
                ended = True
            elif kind == "start":
                raise ApiError(400, "the session has started already", "type")
            else:
                raise ApiError(400, f"unknown message type {loggable(kind, 40)!r}; expected text or end", "type")

    async def add(self, text: str) -> None:
        self.received += len(text)
        limit = self.settings.max_input_chars
        if self.received > limit:
            raise ApiError(413, f"text is over {limit} characters in all (the limit)", "text")
        complete, self.buffer = complete_sentences(self.buffer + text)
        if complete:
            await self.speak(complete)

    async def end(self) -> None:
        rest, self.buffer = self.buffer.strip(), ""
        if rest:
            await self.speak(rest)
        if not self.chunks:
            raise ApiError(400, "text is empty: no text was sent before end", "text")
        self.state.worker.close_text(self.job)

    async def speak(self, text: str) -> None:
        """Normalise, plan and queue complete sentences."""
        pieces = await run_in_threadpool(plan_text, self.state.tts, check_text(text, self.settings, "text"), "text")
        if self.first_text is None:
            self.first_text = time.monotonic()
        self.chunks += len(pieces)
        self.state.worker.extend(self.job, pieces)
        self.state.metrics.waiting_chunks.set(self.state.worker.waiting_chunks)

    async def send_audio(self) -> None:
        """Send the job's audio as it is made; raises ApiError when the job fails or the client leaves."""
        async with contextlib.aclosing(self.stream.chunks()) as chunks:
            async for data in chunks:
                if data:
                    await self.ws.send_bytes(data)
        if self.stream.error is not None:
            raise worker_error(self.stream.error)

    async def run(self) -> None:
        """The whole session, to its close (the guard counts and logs it with its close code)."""
        try:
            await self.begin()
            self.reader = asyncio.create_task(self.read_text())
            writer = asyncio.create_task(self.send_audio())
            try:
                await asyncio.wait({self.reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                if self.reader.done():  # it ends only by raising: a bad message or the client gone
                    await self.reader
                await writer
            finally:
                for task in (self.reader, writer):
                    task.cancel()
                await asyncio.gather(self.reader, writer, return_exceptions=True)
            await self.done()
        except (ClientGone, WebSocketDisconnect):
            log.debug("job %s: the WebSocket client went away", self.job.id if self.job else "-")
        except ApiError as exc:
            await self.refuse(exc.status, exc.message, exc.param)
        except Exception:
            log.exception("WebSocket session failed")
            await self.refuse(500, "internal server error")
        finally:
            if self.job is not None:
                self.state.worker.cancel(self.job)  # no-op once it is over; otherwise it is dropped

    async def done(self) -> None:
        job, stream, metrics = self.job, self.stream, self.state.metrics
        rate = stream.rate
        ttfa = None if stream.first_audio is None or self.first_text is None else stream.first_audio - self.first_text
        if ttfa is not None:
            metrics.ttfa.observe(ttfa)
        metrics.audio_seconds.inc(stream.samples / rate)
        chars = sum(len(p) for p in job.pieces)
        usage = {"input_tokens": chars, "output_tokens": job.tokens, "total_tokens": chars + job.tokens}
        await self.ws.send_text(json.dumps({
            "type": "audio.done", "samples": stream.samples, "seconds": round(stream.samples / rate, 3),
            "sample_rate": rate, "chunks": self.chunks, "time_to_first_audio": None if ttfa is None else round(ttfa, 3),
            "usage": usage}))
        log.debug("job %d: streamed %.2f s of audio over a WebSocket", job.id, stream.samples / rate)
        await self.ws.close(NORMAL)

    async def refuse(self, status: int, message: str, param: Optional[str] = None) -> None:
        """Tell the client why (an error frame), then close with the code for it (a client already gone is let be)."""
        with contextlib.suppress(Exception):
            await self.ws.send_text(error_event(status, message, param))
            await self.ws.close(close_code(status), close_reason(message))


async def refuse_socket(receive, send, status: int, message: str, param: Optional[str] = None) -> None:
    """Refuse a WebSocket at the ASGI level (the guard's refusals): accept it, send the error frame, close."""
    connect = await receive()
    if connect["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": error_event(status, message, param)})
    await send({"type": "websocket.close", "code": close_code(status), "reason": close_reason(message)})


async def serve_socket(state, ws: WebSocket) -> None:
    """The route: accept the socket and run its session."""
    await ws.accept()
    await Session(state, ws).run()
