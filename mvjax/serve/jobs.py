"""A speech request inside the server: :class:`Job` (its utterance, deadline and events) and the errors
that end one, each carrying the HTTP status the server answers with."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable, Optional

import numpy as np

from mvjax.core.errors import MvjaxError
from mvjax.inference.scheduler import Utterance


class WorkerError(MvjaxError, RuntimeError):
    """A job that could not be served; ``status`` is the HTTP status the server answers with."""

    status = 500


class QueueFull(WorkerError):
    status = 503


class Draining(WorkerError):
    status = 503


class DeadlineExceeded(WorkerError):
    status = 504


class Cancelled(WorkerError):
    status = 499


@dataclasses.dataclass
class ChunkAudio:
    """A finished piece of a job: planned chunk ``index`` (a chunk re-split after overflowing its
    block arrives as several pieces with one index), its waveform at the codec's rate."""

    index: int
    wav: np.ndarray  # (channels, samples)
    frames: int
    tokens: np.ndarray  # (2, frames) first-stage codes
    generated_tokens: int
    continues: bool = False  # more audio of a chunk some of whose audio was already sent (streaming within it)


_EMPTY = object()


class Job:
    """One request's work and its results. ``utterance``: what the scheduler runs (planned text,
    voice, key, sampling, decoder; its ``deliver`` is set here). Events are :class:`ChunkAudio` in
    order, a :class:`WorkerError`, then None (the job is over). A thread consumer calls
    :meth:`next_event`; an asyncio consumer passes ``notify`` (called from the worker thread
    whenever events arrive, e.g. ``loop.call_soon_threadsafe`` of an ``asyncio.Event.set``) and
    calls :meth:`poll`."""

    _ids = itertools.count(1)
    EMPTY = _EMPTY  # what :meth:`poll` returns when no event is waiting

    def __init__(self, utterance: Utterance, seed: int, deadline: float, notify: Optional[Callable[[], None]] = None,
                 voice: Optional[str] = None):
        self.id = next(self._ids)
        self.utterance = utterance
        utterance.deliver, utterance.on_piece = self._deliver, self._piece
        self.seed = seed
        self.voice = voice  # the voice's name, for the log (None: an uploaded recording, or not said)
        self.notify = notify
        self.deadline = deadline
        self.submitted = time.monotonic()
        self.first_audio: Optional[float] = None
        self.finished: Optional[float] = None
        self.tokens = 0  # first-stage tokens of the chunks delivered
        self.error: Optional[WorkerError] = None
        self._events: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._cancelled = threading.Event()

    @property
    def pieces(self) -> list[str]:
        return list(self.utterance.pieces)

    @property
    def stream(self) -> bool:
        return self.utterance.stream

    def summary(self) -> str:
        """The job in a few words for its request's log line: id, outcome, voice, seed, size, tokens,
        time to first audio and in all (no text)."""
        if self.error is not None:
            outcome = f"{self.error.status} {type(self.error).__name__}"
        else:
            outcome = "ok" if self.done else ("cancelled" if self.cancelled else "unfinished")
        end = self.finished if self.finished is not None else time.monotonic()
        first = "" if self.first_audio is None else f", first audio after {self.first_audio - self.submitted:.2f} s"
        pieces = self.utterance.pieces
        return (f"job {self.id}: {outcome}, voice {self.voice or '-'}, seed {self.seed}, "
                f"{sum(len(p) for p in pieces)} characters in {len(pieces)} chunks, {self.tokens} tokens"
                f"{first}, {end - self.submitted:.2f} s")

    # --- consumer side ---

    def next_event(self, timeout: Optional[float] = None):
        """The next :class:`ChunkAudio` or :class:`WorkerError`; None when the job is over. Raises
        TimeoutError when nothing arrived within ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._events, timeout):
                raise TimeoutError
            return self._events.popleft()

    def poll(self):
        """The next event, or :attr:`EMPTY` when none is waiting (never blocks)."""
        with self._cond:
            return self._events.popleft() if self._events else _EMPTY

    def cancel(self) -> None:
        """The client is gone: chunks not yet scheduled are never computed."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self.finished is not None

    # --- worker side ---

    def _push(self, *events) -> None:
        with self._cond:
            self._events.extend(events)
            self._cond.notify_all()
        if self.notify is not None:
            self.notify()

    def fail(self, error: WorkerError) -> None:
        """The job ends with ``error`` (no-op once it is over)."""
        if self.finished is None:
            self.error, self.finished = error, time.monotonic()
            self._push(error, None)

    def _deliver(self, utterance: Utterance, parts: list) -> None:
        """The scheduler's callback: planned chunk ``parts[0].order[0]`` (its pieces, in order) is ready;
        no parts: an open utterance was closed with everything delivered."""
        if self.finished is not None:
            return
        out = [ChunkAudio(c.order[0], c.wav, c.report.frames - c.emitted, c.first_stage_codes[:, c.emitted:],
                          c.report.generated_tokens, continues=c.emitted > 0) for c in parts]
        self.tokens += sum(p.generated_tokens for p in out)
        if self.first_audio is None and out:
            self.first_audio = time.monotonic()
        if utterance.done:
            self.finished = time.monotonic()
            out.append(None)
        self._push(*out)

    def _piece(self, utterance: Utterance, piece) -> None:
        """The scheduler's callback for audio of a chunk still being decoded (streaming within a chunk)."""
        if self.finished is not None:
            return
        frames = piece.codes.shape[1]
        if self.first_audio is None:
            self.first_audio = time.monotonic()
        self._push(ChunkAudio(piece.chunk.order[0], piece.wav, frames, piece.codes[:2], 0, continues=piece.continues))
