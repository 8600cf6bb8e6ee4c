"""One model worker for many requests: chunks of every waiting request are synthesised together.

A request becomes a :class:`~mvjax.serve.jobs.Job`: its text planned into chunks as
:meth:`mvjax.TTS.synthesize` plans it, one speaker embedding, its own sampling settings and seed.

With ``batching="engine"`` (the default on one device) the first stage runs through the
continuous-batching :class:`~mvjax.inference.engine.FirstStageEngine` with ``max_batch`` slots:
between two decode calls the worker admits chunks into free slots (oldest job first, one chunk
per job per round; a streamed job has one chunk in flight at a time, so its chunks come in
order and its first one soonest), and every chunk the engine retires goes at once through the
second stage and the decoder to its job. A request never waits for the longest chunk of a batch
it happened to join. With ``batching="static"`` each round takes up to ``max_batch`` waiting
chunks the same way and runs both GPT stages on them as one batch. Either way rows carry their
own sampling values and keys (mixed lengths, voices and settings), waveforms are decoded grouped
by decoder, and finished chunks reach their job in order.

A chunk's key is folded from its job's seed and its position, as in the library, so a request's
tokens do not depend on what it was batched with: the same request alone gives the same tokens.

The queue is bounded (:class:`QueueFull`, answered with 503 and Retry-After); a job past its
deadline or cancelled (the client went away) is dropped before its next chunk is scheduled, so
its remaining chunks are never computed. :meth:`SpeechWorker.drain` stops admitting jobs and
waits for the ones in flight.

When a job is over the worker logs its summary (:meth:`Job.summary`) at DEBUG: a server's one INFO
line per request is its access line, which carries that summary; batches and engine rounds are for
``on_batch`` (the server logs them at DEBUG). Over
several devices the engine cannot run: ``batching="engine"`` falls back to static batches and
says so once (a WARNING and :attr:`SpeechWorker.batching_note`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Optional

import numpy as np

from mvjax.inference.engine import DEFAULT_STEPS
from mvjax.inference.options import SynthesisOptions
from mvjax.serve.jobs import (
    Cancelled,
    ChunkAudio,
    DeadlineExceeded,
    Draining,
    Job,
    QueueFull,
    WorkerError,
)

log = logging.getLogger("mvjax.serve")


@dataclasses.dataclass
class BatchStats:
    """What one worker batch did (for metrics and logs)."""

    chunks: int  # chunks decoded together (a static batch; the engine's occupied slots in this round)
    jobs: int  # requests they belong to
    tokens: int  # first-stage tokens generated
    stage1_seconds: float
    seconds: float
    started: int = 0  # chunks whose first stage started in this batch or round


class SpeechWorker:
    """The model worker thread. ``tts``: a loaded :class:`mvjax.TTS`; ``max_batch``: chunks per
    batch (1 = one chunk at a time, no cross-request batching); ``max_jobs``: jobs admitted at once
    (queued or running); ``on_batch``: called with a :class:`BatchStats` after every batch;
    ``max_new_tokens``: first-stage tokens per chunk (plan the jobs' texts with the same value);
    ``batch_wait``: seconds a batch that is not full waits for more requests before it starts
    (clients whose answers just finished send their next request a few milliseconds later)."""

    def __init__(self, tts, max_batch: int = 8, max_jobs: int = 64, on_batch: Optional[Callable] = None,
                 on_drop: Optional[Callable] = None, max_new_tokens: Optional[int] = None,
                 batch_wait: float = 0.0, batching: str = "engine", engine_steps: int = DEFAULT_STEPS):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if batching not in ("engine", "static"):
            raise ValueError(f"batching must be 'engine' or 'static', not {batching!r}")
        self.tts = tts
        # The continuous-batching engine needs one device; over a mesh the batches stay static, and
        # the worker says so once (the log and ``batching_note``, which /health shows).
        self.batching_note: Optional[str] = None
        use_engine = batching == "engine" and tts.engine_available
        if batching == "engine" and not use_engine:
            from mvjax.core.parallel import device_count

            self.batching_note = (f"the continuous-batching engine runs on one device and this model is spread "
                                  f"over {device_count(tts.mesh)}: batches are static")
            log.warning("%s", self.batching_note)
        self.engine = tts.first_stage_engine(max_batch, engine_steps) if use_engine else None
        self.batching = "engine" if self.engine is not None else "static"
        if self.engine is not None:
            self.engine.reset()  # one worker per model: the engine (and its compiled code) is the TTS's
        # Static batches never go through the engine (the library's default for its first stage).
        self.options = SynthesisOptions(batch_size=max_batch, max_new_tokens=max_new_tokens, batching=self.batching,
                                        engine_steps=engine_steps)
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
        self._thread = threading.Thread(target=self._run_engine if self.engine is not None else self._run,
                                        name="mvjax-speech-worker", daemon=True)
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
                self._end(job, Draining("the server stopped before this request was finished"))
            self._jobs.clear()
            self._lock.notify_all()
        self._thread.join(timeout=60)
        if self.engine is not None and not self._thread.is_alive():
            self.engine.reset()

    # --- the loop ---

    def _take(self, room: int) -> list[tuple[Job, int]]:
        """Under the lock: drop finished jobs; drop cancelled and late ones (with the engine, their
        chunks in flight are cancelled too; a static batch is never running here); then up to
        ``room`` chunks: one of every waiting job first (oldest first), spare room to more chunks of
        whole-response jobs. A streamed job has one chunk in flight at a time: its chunks come in
        order, its first one is not held back by the others, and a client that leaves wastes at
        most one."""
        now = time.monotonic()
        for job in list(self._jobs):
            if job.done:
                self._jobs.remove(job)
                continue
            error = None
            if job.cancelled:
                error = Cancelled("the client went away")
            elif now > job.deadline:
                error = DeadlineExceeded("the request did not finish within the server's time limit")
            if error is not None:
                if job.running:
                    self.engine.cancel(lambda request, job=job: request.tag[0] is job)
                    job.running = 0
                self._drop(job, error)
        picked: list[tuple[Job, int]] = []
        pending = [j for j in self._jobs if j.todo and not (j.stream and j.running)]
        while pending and len(picked) < room:
            for job in list(pending):
                if len(picked) >= room:
                    break
                picked.append((job, job.todo.popleft()))
                job.running += 1
                if job.started is None:
                    job.started = now
                if not job.todo or job.stream:
                    pending.remove(job)
        return picked

    def _schedulable(self) -> int:
        """Under the lock: chunks that could start now (a streamed job offers one, none while one of
        its chunks is in flight)."""
        return sum(min(len(j.todo), 1 if j.stream else len(j.todo)) for j in self._jobs
                   if not j.cancelled and not (j.stream and j.running))

    def _drop(self, job: Job, error: WorkerError) -> None:
        self._end(job, error)
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
                picked = self._take(self.max_batch)
                self._lock.notify_all()
            if not picked:
                continue
            try:
                self._synthesise(picked)
            except Exception as exc:  # a bug or a device failure: fail this batch's jobs, keep serving
                log.exception("a synthesis batch failed")
                self._fail_jobs({id(j): j for j, _ in picked}.values(), exc)
            finally:
                self._forget_finished()

    @staticmethod
    def _end(job: Job, error: Optional[WorkerError] = None) -> None:
        """Under the lock: ``job`` is over, its audio all delivered or (``error``) failed; the
        request's summary, at DEBUG (a server's one INFO line per request is its access line, which carries it)."""
        if error is not None:
            if job.done:
                return
            job._fail(error)
        log.debug("%s", job.summary())

    def _deliver(self, job: Job, index: int, parts: list) -> None:
        """Under the lock: planned chunk ``index`` of ``job`` (its pieces, in order) is ready."""
        job._deliver(index, [ChunkAudio(index, c.wav, c.report.frames, c.first_stage_codes, c.report.generated_tokens)
                             for c in parts])
        if job.done:
            self._end(job)

    def _fail_jobs(self, jobs, exc: Exception) -> None:
        """``jobs`` were being computed when ``exc`` happened: each ends with a 500 (see the log)."""
        with self._lock:
            for job in list(jobs):
                job.running = 0
                if job in self._jobs:
                    self._drop(job, WorkerError(f"synthesis failed ({type(exc).__name__}); see the server log"))

    def _forget_finished(self) -> None:
        with self._lock:
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
        opts = self.options
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
                self._deliver(job, index, parts)
            self._lock.notify_all()
        self.on_batch(BatchStats(len(picked), len(jobs), tokens, stage1, time.perf_counter() - start, len(picked)))

    # --- the continuous-batching loop (one device) ---

    def _submit_chunk(self, job: Job, chunk) -> None:
        from mvjax.inference.stages import engine_request, tokenize

        tokenize(self.tts.tokenizers, [chunk])
        request = engine_request(chunk, job.embedding, job.params.sampling, self.max_new_tokens)
        request.tag = (job, chunk)
        self.engine.submit(request)

    def _run_engine(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                if engine.idle:
                    self._lock.wait_for(lambda: self._stop or any(j.todo or j.done or j.cancelled for j in self._jobs))
                    if self.batch_wait > 0 and self._schedulable() < self.max_batch:
                        self._lock.wait_for(lambda: self._stop or self._schedulable() >= self.max_batch,
                                            self.batch_wait)
                if self._stop:
                    return
                picked = self._take(engine.free_slots - len(engine.waiting))
                self._lock.notify_all()
            try:
                for job, index in picked:
                    chunk = self.tts.chunks_for(0, job.pieces, job.key, job.params.sampling)[index]
                    job.leaves[index] = 1
                    self._submit_chunk(job, chunk)
                if not engine.idle:
                    self._engine_round(len(picked))
            except Exception as exc:  # a bug or a device failure: fail the jobs in flight, keep serving
                log.exception("a synthesis round failed")
                engine.reset()
                with self._lock:
                    running = [j for j in self._jobs if j.running]
                self._fail_jobs(running, exc)
            finally:
                self._forget_finished()

    def _engine_round(self, started: int) -> None:
        """One engine step; finished chunks go through the second stage and the decoder and are
        handed to their jobs (a chunk that overflowed its block goes back in as two halves)."""
        from mvjax.inference.stages import record_first_stage

        tts, engine, opts = self.tts, self.engine, self.options
        start = time.perf_counter()
        in_flight = [request.tag[0] for request, _ in engine.running.values()]
        results = engine.step()
        stage1 = time.perf_counter() - start
        leaves: list[tuple[Job, object]] = []
        for result in results:
            job, chunk = result.tag
            record_first_stage(chunk, result.sequence, result.finished, result.hit_block_end, tts.layout,
                               tts.config2.block_size)
            halves = tts.overflow_halves(chunk, opts.long_form, len(chunk.order) - 1)
            if halves is not None and not (job.cancelled or job.done):
                with self._lock:
                    job.leaves[chunk.order[0]] += len(halves) - 1
                    job.running += len(halves) - 1
                for half in halves:
                    self._submit_chunk(job, half)
                continue
            leaves.append((job, chunk))
        if leaves:
            self._finish(leaves)
        self.on_batch(BatchStats(len(in_flight), len({id(j) for j in in_flight}), engine.last_step_tokens, stage1,
                                 time.perf_counter() - start, started))

    def _finish(self, leaves: list) -> None:
        """Second stage and waveforms for chunks whose first stage is done; a planned chunk is
        delivered once all its pieces are."""
        tts, n = self.tts, self.max_batch
        jobs = list({id(j): j for j, _ in leaves}.values())
        row = {id(j): u for u, j in enumerate(jobs)}
        chunks = []
        for job, chunk in leaves:
            chunk.utterance = row[id(job)]
            chunks.append(chunk)
        tts.second_stage(chunks, np.stack([j.embedding for j in jobs]), self.options, n)
        for decoder in ("mbd", "encodec"):
            group = [c for c in chunks if jobs[c.utterance].params.decoder == decoder]
            if group:
                tts.decode_chunks(group, decoder, n)
        with self._lock:
            for job, chunk in leaves:
                index = chunk.order[0]
                job.running -= 1
                job.parts[index].append(chunk)
                job.leaves[index] -= 1
                if job.leaves[index] or job.done:
                    continue
                self._deliver(job, index, sorted(job.parts.pop(index), key=lambda c: c.order))
            self._lock.notify_all()
