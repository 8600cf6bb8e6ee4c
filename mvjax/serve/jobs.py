"""A speech request inside the server: :class:`Job` (its chunks, settings and events) and the errors
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
from mvjax.inference import keys as K
from mvjax.inference.decode import SamplingConfig


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


@dataclasses.dataclass(frozen=True)
class SpeechParams:
    """One request's settings (checked by the HTTP layer)."""

    seed: int
    temperature: float = 1.0
    top_p: Optional[float] = 0.95
    guidance: float = 3.0
    decoder: str = "mbd"

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(guidance=self.guidance, temperature=self.temperature, top_p=self.top_p)


@dataclasses.dataclass
class ChunkAudio:
    """A finished piece of a job: planned chunk ``index`` (a chunk re-split after overflowing its
    block arrives as several pieces with one index), its waveform at the codec's rate."""

    index: int
    wav: np.ndarray  # (channels, samples)
    frames: int
    tokens: np.ndarray  # (2, frames) first-stage codes
    generated_tokens: int


_EMPTY = object()


class Job:
    """One request's work and its results. Events are :class:`ChunkAudio` in order, a
    :class:`WorkerError`, then None (the job is over). A thread consumer calls :meth:`next_event`;
    an asyncio consumer passes ``notify`` (called from the worker thread whenever events arrive,
    e.g. ``loop.call_soon_threadsafe`` of an ``asyncio.Event.set``) and calls :meth:`poll`."""

    _ids = itertools.count(1)
    EMPTY = _EMPTY  # what :meth:`poll` returns when no event is waiting

    def __init__(self, pieces: list[str], embedding: np.ndarray, params: SpeechParams, deadline: float,
                 notify: Optional[Callable[[], None]] = None, stream: bool = False, voice: Optional[str] = None):
        self.id = next(self._ids)
        self.voice = voice  # the voice's name, for the log (None: an uploaded recording, or not said)
        self.stream = stream  # a streamed job has one chunk per batch: its first audio comes soonest
        self.notify = notify
        self.pieces = list(pieces)
        self.embedding = np.asarray(embedding, np.float32)
        self.params = params
        self.deadline = deadline
        self.key = K.keys_for(params.seed, [0])[0]
        self.submitted = time.monotonic()
        self.started: Optional[float] = None
        self.first_audio: Optional[float] = None
        self.finished: Optional[float] = None
        self.todo = collections.deque(range(len(self.pieces)))  # chunk indices not yet scheduled
        self.running = 0  # chunks being computed (in a batch, or in the engine's slots or queue)
        self.leaves: dict[int, int] = {}  # planned chunk index -> pieces still being computed (a re-split adds one)
        self.parts: dict[int, list] = collections.defaultdict(list)  # planned chunk index -> finished pieces
        self.ready: dict[int, list[ChunkAudio]] = {}
        self.next_index = 0
        self.tokens = 0  # first-stage tokens of the chunks delivered
        self.error: Optional[WorkerError] = None
        self._events: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._cancelled = threading.Event()

    def summary(self) -> str:
        """The job in a few words for its request's log line: id, outcome, voice, seed, size, tokens,
        time to first audio and in all (no text)."""
        if self.error is not None:
            outcome = f"{self.error.status} {type(self.error).__name__}"
        else:
            outcome = "ok" if self.done else ("cancelled" if self.cancelled else "unfinished")
        end = self.finished if self.finished is not None else time.monotonic()
        first = "" if self.first_audio is None else f", first audio after {self.first_audio - self.submitted:.2f} s"
        return (f"job {self.id}: {outcome}, voice {self.voice or '-'}, seed {self.params.seed}, "
                f"{sum(len(p) for p in self.pieces)} characters in {len(self.pieces)} chunks, {self.tokens} tokens"
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

    def _fail(self, error: WorkerError) -> None:
        if self.finished is None:
            self.error, self.finished = error, time.monotonic()
            self.todo.clear()
            self._push(error, None)

    def _deliver(self, index: int, pieces: list[ChunkAudio]) -> None:
        self.ready[index] = pieces
        self.tokens += sum(p.generated_tokens for p in pieces)
        out = []
        while self.next_index in self.ready:
            out += self.ready.pop(self.next_index)
            self.next_index += 1
        if out and self.first_audio is None:
            self.first_audio = time.monotonic()
        if self.next_index == len(self.pieces):
            self.finished = time.monotonic()
            out.append(None)
        if out:
            self._push(*out)
