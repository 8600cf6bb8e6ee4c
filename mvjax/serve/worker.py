"""One model worker for many requests: chunks of every waiting request are synthesised together.

A request becomes a :class:`Job`: its text planned into chunks as :meth:`mvjax.TTS.synthesize`
plans it, one speaker embedding, its own sampling settings and seed. The worker thread loops:
take up to ``max_batch`` chunks from the jobs waiting (oldest job first, one chunk per job per
round, so a new request's first chunk joins the next batch instead of waiting behind a long
text; a streamed job has at most one chunk in a batch), run both GPT stages on them as one batch (mixed lengths, voices and settings: every row
carries its own sampling values and its own key), decode the waveforms (grouped by decoder),
and hand every finished chunk back to its job in order.

A chunk's key is folded from its job's seed and its position, as in the library, so a request's
tokens do not depend on what it was batched with: the same request alone gives the same tokens.

The queue is bounded (:class:`QueueFull`, answered with 503 and Retry-After); a job past its
deadline or cancelled (the client went away) is dropped before its next chunk is scheduled, so
its remaining chunks are never computed. :meth:`SpeechWorker.drain` stops admitting jobs and
waits for the ones in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Optional

import numpy as np

from mvjax.core.errors import MvjaxError
from mvjax.inference import keys as K
from mvjax.inference.decode import SamplingConfig
from mvjax.inference.options import SynthesisOptions

log = logging.getLogger("mvjax.serve")


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
                 notify: Optional[Callable[[], None]] = None, stream: bool = False):
        self.id = next(self._ids)
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
        self.running = 0  # chunks in the current batch
        self.ready: dict[int, list[ChunkAudio]] = {}
        self.next_index = 0
        self.error: Optional[WorkerError] = None
        self._events: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._cancelled = threading.Event()

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


@dataclasses.dataclass
class BatchStats:
    """What one worker batch did (for metrics and logs)."""

    chunks: int
    jobs: int
    tokens: int  # first-stage tokens generated
    stage1_seconds: float
    seconds: float


class SpeechWorker:
    """The model worker thread. ``tts``: a loaded :class:`mvjax.TTS`; ``max_batch``: chunks per
    batch (1 = one chunk at a time, no cross-request batching); ``max_jobs``: jobs admitted at once
    (queued or running); ``on_batch``: called with a :class:`BatchStats` after every batch;
    ``max_new_tokens``: first-stage tokens per chunk (plan the jobs' texts with the same value);
    ``batch_wait``: seconds a batch that is not full waits for more requests before it starts
    (clients whose answers just finished send their next request a few milliseconds later)."""

    def __init__(self, tts, max_batch: int = 8, max_jobs: int = 64, on_batch: Optional[Callable] = None,
                 on_drop: Optional[Callable] = None, max_new_tokens: Optional[int] = None,
                 batch_wait: float = 0.0):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.tts = tts
        self.max_batch = int(max_batch)
        self.max_jobs = int(max_jobs)
        self.max_new_tokens = max_new_tokens
        self.batch_wait = float(batch_wait)
        self.on_batch = on_batch or (lambda stats: None)
        self.on_drop = on_drop or (lambda job, error: None)
        self._jobs: list[Job] = []
        self._lock = threading.Condition()
        self._accepting = True
        self._stop = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="mvjax-speech-worker", daemon=True)
        self._thread.start()

    # --- admission ---

    def submit(self, job: Job) -> Job:
        with self._lock:
            if not self._accepting:
                raise Draining("the server is shutting down; try another instance")
            if len(self._jobs) >= self.max_jobs:
                raise QueueFull(f"the server is busy ({len(self._jobs)} requests in flight); retry shortly")
            self._jobs.append(job)
            self._lock.notify_all()
        return job

    @property
    def depth(self) -> int:
        """Jobs admitted and not finished (waiting or running)."""
        with self._lock:
            return len(self._jobs)

    @property
    def waiting_chunks(self) -> int:
        with self._lock:
            return sum(len(j.todo) for j in self._jobs)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: a rough guess from the work queued."""
        return max(1, min(60, self.waiting_chunks // max(1, self.max_batch) + 1))

    def drain(self, timeout: Optional[float] = None) -> bool:
        """Refuse new jobs and wait until the admitted ones are finished; True if they all were."""
        with self._lock:
            self._accepting = False
            return self._lock.wait_for(lambda: not self._jobs, timeout)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def close(self) -> None:
        with self._lock:
            self._accepting, self._stop = False, True
            for job in self._jobs:
                job._fail(Draining("the server stopped before this request was finished"))
            self._jobs.clear()
            self._lock.notify_all()
        self._thread.join(timeout=60)

    # --- the loop ---

    def _take(self) -> list[tuple[Job, int]]:
        """Under the lock: drop finished, cancelled and late jobs, then pick the next batch."""
        now = time.monotonic()
        for job in list(self._jobs):
            if job.done:
                self._jobs.remove(job)
            elif job.running:
                continue
            elif job.cancelled:
                self._drop(job, Cancelled("the client went away"))
            elif now > job.deadline:
                self._drop(job, DeadlineExceeded("the request did not finish within the server's time limit"))
        # One chunk of every waiting job first (oldest first); spare rows then go to more chunks of
        # whole-response jobs. A streamed job never has more than one chunk in a batch: its first
        # chunk is not held back by the others, and a client that leaves wastes at most one.
        picked: list[tuple[Job, int]] = []
        pending = [j for j in self._jobs if j.todo]
        while pending and len(picked) < self.max_batch:
            for job in list(pending):
                if len(picked) >= self.max_batch:
                    break
                picked.append((job, job.todo.popleft()))
                if not job.todo or job.stream:
                    pending.remove(job)
        for job, _ in picked:
            job.running += 1
            if job.started is None:
                job.started = now
        return picked

    def _schedulable(self) -> int:
        """Under the lock: chunks the next batch could take (a streamed job offers one)."""
        return sum(min(len(j.todo), 1 if j.stream else len(j.todo)) for j in self._jobs if not j.cancelled)

    def _drop(self, job: Job, error: WorkerError) -> None:
        job._fail(error)
        self._jobs.remove(job)
        self.on_drop(job, error)
        self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stop or any(j.todo or j.done or j.cancelled for j in self._jobs))
                if self.batch_wait > 0 and self._schedulable() < self.max_batch:
                    self._lock.wait_for(lambda: self._stop or self._schedulable() >= self.max_batch, self.batch_wait)
                if self._stop:
                    return
                picked = self._take()
                self._busy = bool(picked)
                self._lock.notify_all()
            if not picked:
                continue
            try:
                self._synthesise(picked)
            except Exception as exc:  # a bug or a device failure: fail this batch's jobs, keep serving
                log.exception("a synthesis batch failed")
                with self._lock:
                    for job in {id(j): j for j, _ in picked}.values():
                        job.running = 0
                        if job in self._jobs:
                            self._drop(job, WorkerError(f"synthesis failed ({type(exc).__name__}); see the server log"))
            finally:
                with self._lock:
                    self._busy = False
                    for job in list(self._jobs):
                        if job.done:
                            self._jobs.remove(job)
                    self._lock.notify_all()

    def _synthesise(self, picked: list[tuple[Job, int]]) -> None:
        start = time.perf_counter()
        tts = self.tts
        jobs = list({id(j): j for j, _ in picked}.values())
        slot = {id(j): u for u, j in enumerate(jobs)}
        embeddings = np.stack([j.embedding for j in jobs])
        chunks = []
        for job, index in picked:
            chunk = tts.chunks_for(slot[id(job)], job.pieces, job.key, job.params.sampling)[index]
            chunks.append(chunk)
        n = self.max_batch
        opts = SynthesisOptions(batch_size=n, max_new_tokens=self.max_new_tokens)
        sizes = {"stage1": n, "stage2": n, "decoder": n}
        tts.last_timings = {}
        chunks = tts.run_token_stages(chunks, embeddings, opts, sizes)
        stage1 = tts.last_timings.get("stage1", 0.0)
        for decoder in ("mbd", "encodec"):
            group = [c for c in chunks if jobs[c.utterance].params.decoder == decoder]
            if group:
                tts.decode_chunks(group, decoder, n)
        by_piece: dict[tuple[int, int], list] = collections.defaultdict(list)
        for c in chunks:
            by_piece[(c.utterance, c.order[0])].append(c)
        tokens = 0
        with self._lock:
            for (u, index), parts in sorted(by_piece.items()):
                job = jobs[u]
                job.running -= 1
                parts.sort(key=lambda c: c.order)
                tokens += sum(c.report.generated_tokens for c in parts)
                if job.done:
                    continue
                job._deliver(index, [ChunkAudio(index, c.wav, c.report.frames, c.first_stage_codes,
                                                c.report.generated_tokens) for c in parts])
            self._lock.notify_all()
        self.on_batch(BatchStats(len(picked), len(jobs), tokens, stage1, time.perf_counter() - start))
