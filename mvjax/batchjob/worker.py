"""One model replica of the dataset job: rows in, finished and encoded results out.

A :class:`Synthesizer` loads the model once (on this process's devices: a mesh over all of them
when there are several) and runs rows through one :class:`~mvjax.inference.scheduler.Scheduler`,
so the continuous-batching engine keeps its slots full across rows: a row joins as soon as a slot
frees up, and its result is handed back as soon as its last chunk is decoded (not when a batch
ends). Each row is planned and keyed by :meth:`mvjax.TTS.utterance`, as ``python -m
mvjax.synthesize`` keys a text given alone with the row's seed: its tokens depend on nothing else
(not the worker, its batch or its neighbours).

A row that cannot be spoken (its text, its voice: ``final``, as planning is deterministic) or whose
round failed is an :class:`Outcome` with the reason, never an exception: the driver decides whether
to retry it. Results carry the encoded
audio (and tokens) as bytes, because only the driver writes files. :class:`RayWorker` is the same
replica as a Ray Data actor (a callable class for ``map_batches``); nothing here imports Ray.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import socket
import time
import warnings
from typing import Iterable, Iterator, Optional

import numpy as np

from mvjax.audio.io import encode_audio
from mvjax.batchjob.records import model_digest
from mvjax.core.compile_cache import enable_compilation_cache
from mvjax.core.errors import MvjaxError
from mvjax.inference.decode import BlockFullWarning
from mvjax.inference.options import SamplingConfig, SynthesisOptions
from mvjax.inference.speaker import ShortReferenceWarning
from mvjax.sources.demo import demo_model_dir
from mvjax.sources.resolve import resolve_model

log = logging.getLogger("mvjax")
DEMO_MODEL = "mvjax:demo"  # the model spec of --demo (each worker builds or reuses the demo model); not a path
AUDIO_SUBTYPE = "PCM_16"  # as python -m mvjax.synthesize writes


class WorkerError(MvjaxError, RuntimeError):
    """A replica that cannot start (its model differs from the driver's)."""


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """What every row of a job shares: synthesis options (their seed and first-stage sampling are each
    row's defaults), output format, whether token files are kept, and how the model is loaded."""

    options: SynthesisOptions
    fmt: str = "wav"
    save_tokens: bool = False
    quantize: Optional[str] = None
    kv_cache: Optional[str] = None
    matmul_precision: Optional[str] = None


@dataclasses.dataclass
class Task:
    """A row as a worker sees it: its voice already an embedding (the driver resolved names and files)."""

    id: str
    text: str
    embedding: np.ndarray
    seed: int
    sampling: SamplingConfig


@dataclasses.dataclass
class Outcome:
    id: str
    error: Optional[str] = None  # None: ok
    audio: bytes = b""
    tokens: bytes = b""
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    truncated: bool = False
    worker: str = ""
    # The error is the row's own input (a text the model cannot read, a voice of the wrong size): planning
    # is deterministic, so it would fail the same way on any worker and is not tried again.
    final: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def reason(exc: BaseException) -> str:
    """One line for a row's error: an MvjaxError's own message, anything else with its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, MvjaxError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def model_directory(model: str):
    """The converted model directory for a ``--model`` spec (:data:`DEMO_MODEL`: the demo model, built on first use)."""
    return demo_model_dir() if model == DEMO_MODEL else resolve_model(model, log_fn=log.info)


class Synthesizer:
    """The model, loaded once, and the rows' path through it. ``digest``: the model digest the driver
    computed; a replica whose model differs (another file at the same path on another host) refuses
    to start rather than mix two models' outputs in one job."""

    def __init__(self, model: str, settings: JobSettings, digest: Optional[str] = None):
        from mvjax.inference.pipeline import TTS  # the model stack: only where a model is loaded

        self.settings = settings
        model_dir = model_directory(model)
        if digest is not None and model_digest(model_dir) != digest:
            raise WorkerError(f"the model at {model_dir} on {socket.gethostname()} is not the driver's model")
        enable_compilation_cache()
        warnings.filterwarnings("ignore", category=BlockFullWarning)  # a cut-short row says so in its result
        warnings.filterwarnings("ignore", category=ShortReferenceWarning)
        self.tts = TTS.load(model_dir, log_fn=log.info, quantize=settings.quantize, kv_cache=settings.kv_cache,
                            matmul_precision=settings.matmul_precision)
        self.options = settings.options
        if self.options.decoder == "mbd":
            _ = self.tts.diffusion  # a model without one fails here, not in every row
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, tasks: Iterable[Task]) -> Iterator[Outcome]:
        """An :class:`Outcome` per task, each as soon as it is ready (in the order they finish). Rows are
        taken from ``tasks`` as the scheduler has room for them (a window of twice the engine's slots),
        so an iterator over a huge listing is never read ahead of the work."""
        tts, opts = self.tts, self.options
        scheduler = tts.scheduler(opts)
        window = 2 * max(1, int(scheduler.sizes["stage1"])) * tts.devices
        source, live, finished = iter(tasks), {}, collections.deque()

        def deliver(utterance, chunks):
            utterance.chunks += chunks
            if utterance.done:
                finished.append(utterance)

        try:
            while True:
                while len(live) < window:
                    task = next(source, None)
                    if task is None:
                        break
                    try:
                        options = dataclasses.replace(opts, seed=task.seed, sampling=task.sampling)
                        utterance = tts.utterance(task.text, np.asarray(task.embedding, np.float32), options)
                    except MvjaxError as exc:  # the row's text or voice: its error, the rest go on
                        yield Outcome(task.id, reason(exc), worker=self.name, final=True)
                        continue
                    except Exception as exc:  # noqa: BLE001 - a bug: the row's error, tried again elsewhere
                        yield Outcome(task.id, reason(exc), worker=self.name)
                        continue
                    utterance.deliver = deliver
                    live[utterance] = (task, time.perf_counter())
                    scheduler.add(utterance)
                if not live:
                    return
                try:
                    stats = scheduler.step()
                except Exception as exc:  # noqa: BLE001 - a failed round fails the rows it held, not the job
                    log.warning("a synthesis round failed: %s", reason(exc))
                    for utterance in scheduler.reset():
                        task, _ = live.pop(utterance)
                        yield Outcome(task.id, f"synthesis failed: {reason(exc)}", worker=self.name)
                    continue
                while finished:
                    utterance = finished.popleft()
                    task, started = live.pop(utterance)
                    yield self._finish(task, utterance, started)
                if stats is None and not finished and scheduler.idle and live:  # never expected: do not spin
                    for utterance, (task, _) in list(live.items()):
                        yield Outcome(task.id, "the scheduler stopped before this row was done", worker=self.name)
                    live.clear()
        finally:
            scheduler.close()

    def _finish(self, task: Task, utterance, started: float) -> Outcome:
        try:
            speech = self.tts.finish(utterance, self.options)
            audio = encode_audio(speech.audio, speech.sample_rate, "." + self.settings.fmt, AUDIO_SUBTYPE)
            tokens = speech.tokens_npz() if self.settings.save_tokens else b""
        except Exception as exc:  # noqa: BLE001
            return Outcome(task.id, f"finishing the audio failed: {reason(exc)}", worker=self.name)
        return Outcome(task.id, None, audio, tokens, speech.duration, time.perf_counter() - started, speech.truncated,
                       self.name)

    def close(self) -> None:
        self.tts.close()


# --- Tasks and outcomes as Ray Data columns ---------------------------------------------------------


def task_row(task: Task) -> dict:
    return {"id": task.id, "text": task.text, "seed": int(task.seed),
            "sampling": json.dumps(dataclasses.asdict(task.sampling)),
            "embedding": np.asarray(task.embedding, np.float32)}


def tasks_from_batch(batch: dict) -> list[Task]:
    return [Task(str(batch["id"][i]), str(batch["text"][i]), np.asarray(batch["embedding"][i], np.float32),
                 int(batch["seed"][i]), SamplingConfig(**json.loads(str(batch["sampling"][i]))))
            for i in range(len(batch["id"]))]


OUTCOME_FIELDS = [f.name for f in dataclasses.fields(Outcome)]
NUMERIC_FIELDS = {"audio_seconds": np.float64, "wall_seconds": np.float64, "truncated": np.bool_, "final": np.bool_}


def outcomes_batch(outcomes: list[Outcome]) -> dict:
    """Outcomes as columns (text and bytes as object arrays: Arrow strings and binaries)."""
    batch = {}
    for name in OUTCOME_FIELDS:
        values = [getattr(o, name) if name != "error" else (o.error or "") for o in outcomes]
        if name in NUMERIC_FIELDS:
            batch[name] = np.asarray(values, NUMERIC_FIELDS[name])
        else:
            batch[name] = np.empty(len(values), dtype=object)
            batch[name][:] = values
    return batch


def outcomes_from_batch(batch: dict) -> list[Outcome]:
    out = []
    for i in range(len(batch["id"])):
        values = {name: batch[name][i] for name in OUTCOME_FIELDS}
        out.append(Outcome(str(values["id"]), str(values["error"]) or None, bytes(values["audio"]),
                           bytes(values["tokens"]), float(values["audio_seconds"]), float(values["wall_seconds"]),
                           bool(values["truncated"]), str(values["worker"]), bool(values["final"])))
    return out


class RayWorker:
    """A :class:`Synthesizer` as a Ray Data ``map_batches`` actor: one per worker, loading the model once on
    the devices Ray gave it, then a batch of rows per call (run through its engine together)."""

    def __init__(self, model: str, settings: JobSettings, digest: str):
        logging.getLogger("mvjax").setLevel(logging.WARNING)
        self.synthesizer = Synthesizer(model, settings, digest)

    def __call__(self, batch: dict) -> dict:
        return outcomes_batch(list(self.synthesizer.run(tasks_from_batch(batch))))
