"""One model worker for many requests: queueing, deadlines, cancellation and back-pressure.

A request becomes a :class:`~mvjax.serve.jobs.Job` around a scheduler
:class:`~mvjax.inference.scheduler.Utterance` (its text planned as :meth:`mvjax.TTS.synthesize`
plans it, one speaker embedding, its own sampling settings and seed). The worker thread feeds
every admitted job to one :class:`~mvjax.inference.scheduler.Scheduler` and steps it: with
``batching="engine"`` (the default) the first stage runs through the continuous-batching
engine with ``batch_size`` slots per device (one engine per device over several) and a request
joins between two decode calls; with ``"static"`` each round decodes up to ``batch_size`` waiting chunks as one batch.
The scheduler picks chunks fairly (oldest request first, one chunk per request per round; a
streamed request has one chunk in flight, so its first audio comes soonest) and hands each job
its finished chunks in order. A request never waits for the longest chunk of a batch it joined,
and its tokens do not depend on what it was batched with.

The queue is bounded (:class:`QueueFull`, answered with 503 and Retry-After); a job past its
deadline or cancelled (the client went away) is dropped before the next round, so its remaining
chunks are never computed. :meth:`SpeechWorker.drain` stops admitting jobs and waits for the ones
in flight. A job whose text is still arriving (the WebSocket's) is open: :meth:`SpeechWorker.extend`
adds its chunks as sentences complete, :meth:`SpeechWorker.close_text` ends its text, and an idle
worker still wakes for its deadline. When a job is over the worker logs its summary
(:meth:`Job.summary`) at DEBUG (a server's one INFO line per request is its access line, which
carries it); rounds are for ``on_batch``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from mvjax.inference.options import SynthesisOptions
from mvjax.serve.jobs import Cancelled, DeadlineExceeded, Draining, Job, QueueFull, WorkerError

log = logging.getLogger("mvjax.serve")
DEADLINE_CHECK_S = 1.0  # an idle worker looks at its jobs' deadlines this often


class SpeechWorker:
    """The model worker thread. ``tts``: a loaded :class:`mvjax.TTS`; ``options``: the server's
    :class:`~mvjax.inference.options.SynthesisOptions` (``batch_size``: chunks per round, an int;
    1 = no cross-request batching; ``batching``, ``engine_steps``, ``max_new_tokens``); ``max_jobs``:
    jobs admitted at once (queued or running); ``on_batch``: called with a
    :class:`~mvjax.inference.scheduler.RoundStats` after every round; ``batch_wait``: seconds a round
    that is not full waits for more requests before it starts (clients whose answers just finished
    send their next request a few milliseconds later)."""

    def __init__(self, tts, options: SynthesisOptions = SynthesisOptions(), max_jobs: int = 64,
                 on_batch: Optional[Callable] = None, on_drop: Optional[Callable] = None, batch_wait: float = 0.0):
        if not isinstance(options.batch_size, int):
            raise ValueError("the server's batch size must be an integer")
        self.max_batch = n = options.batch_size
        self._lock = threading.Condition(threading.RLock())
        self.scheduler = tts.scheduler(options, {"stage1": n, "stage2": n, "decoder": n}, room=n, lock=self._lock)
        self.engine = self.scheduler.engine
        self.batching = "engine" if self.engine is not None else "static"
        self.devices = tts.devices
        self.max_jobs = int(max_jobs)
        self.batch_wait = float(batch_wait)
        self.on_batch = on_batch or (lambda stats: None)
        self.on_drop = on_drop or (lambda job, error: None)
        self._jobs: list[Job] = []
        self._accepting = True
        self._stop = False
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
            self.scheduler.add(job.utterance)
            self._lock.notify_all()
        return job

    def extend(self, job: Job, pieces: list[str]) -> None:
        """More planned pieces for a job whose text is still arriving (its utterance is open)."""
        with self._lock:
            self.scheduler.extend(job.utterance, pieces)
            self._lock.notify_all()

    def close_text(self, job: Job) -> None:
        """No more text for ``job``: it ends once the pieces it has are delivered."""
        with self._lock:
            self.scheduler.close_text(job.utterance)
            self._lock.notify_all()

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` (its client went away) and wake the worker, which drops it before its next round."""
        job.cancel()
        with self._lock:
            self._lock.notify_all()

    @property
    def depth(self) -> int:
        """Jobs admitted and not finished (waiting or running)."""
        with self._lock:
            return len(self._jobs)

    @property
    def waiting_chunks(self) -> int:
        return self.scheduler.waiting_chunks

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
            for job in list(self._jobs):
                self._drop(job, Draining("the server stopped before this request was finished"))
            self._lock.notify_all()
        self._thread.join(timeout=60)
        if not self._thread.is_alive():
            self.scheduler.close()

    # --- the loop ---

    def _work(self) -> bool:
        """Under the lock: something for the next round to do (or a job to drop or forget)."""
        now = time.monotonic()
        return (self._stop or self.scheduler.busy or self.scheduler.startable() > 0
                or any(j.done or j.cancelled or now > j.deadline for j in self._jobs))

    def _run(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._lock:
                while not self._lock.wait_for(self._work, DEADLINE_CHECK_S):
                    pass  # a job waiting for text has no round to wake the worker at its deadline
                if self.batch_wait > 0 and not scheduler.busy and scheduler.startable() < self.max_batch:
                    self._lock.wait_for(lambda: self._stop or scheduler.startable() >= self.max_batch,
                                        self.batch_wait)
                if self._stop:
                    return
                self._expire()
            try:
                stats = scheduler.step()
                if stats is not None:
                    self.on_batch(stats)
            except Exception as exc:  # a bug or a device failure: fail the jobs in flight, keep serving
                log.exception("a synthesis round failed")
                hit = scheduler.reset()
                with self._lock:
                    for job in [j for j in self._jobs if j.utterance in hit]:
                        self._drop(job, WorkerError(f"synthesis failed ({type(exc).__name__}); see the server log"))
            finally:
                self._forget_finished()

    def _expire(self) -> None:
        """Under the lock: forget finished jobs; drop cancelled and late ones (their chunks in flight
        are cancelled too, their chunks not started never are)."""
        now = time.monotonic()
        self._forget_finished()
        for job in list(self._jobs):
            if job.cancelled:
                self._drop(job, Cancelled("the client went away"))
            elif now > job.deadline:
                self._drop(job, DeadlineExceeded("the request did not finish within the server's time limit"))

    def _drop(self, job: Job, error: WorkerError) -> None:
        """Under the lock: ``job`` ends with ``error`` and leaves the queue and the scheduler."""
        job.fail(error)
        self.scheduler.drop(job.utterance)
        self._jobs.remove(job)
        log.debug("%s", job.summary())
        self.on_drop(job, error)
        self._lock.notify_all()

    def _forget_finished(self) -> None:
        with self._lock:
            for job in [j for j in self._jobs if j.done]:
                self._jobs.remove(job)
                log.debug("%s", job.summary())
            self._lock.notify_all()
