"""The driver of a dataset job: what is left to do, who does it, and every file it writes.

:func:`plan` checks everything before any work starts (the listing, every voice, the outputs) and
decides what is left: a row whose last result is ``ok``, whose file exists and whose digest
(:mod:`mvjax.batchjob.records`) matches is skipped; a failed row, a changed row or one whose file
is gone is done again. :func:`run` hands the rest to a runner (:mod:`mvjax.batchjob.runners`) and
writes each result as it comes back: the audio file (atomically), then its line in
``results.jsonl``. A row that fails is tried again in the next round (on whichever worker takes
it, alone in its task: ``runner(tasks, retry=True)``); it is recorded as an error once it failed
twice with the same reason (or :data:`MAX_ATTEMPTS` times), and the job goes on. A row that got
no result by the end of a round failed with :data:`WORKER_DIED` (a Ray task whose worker process
died every time it ran it yields nothing: :mod:`mvjax.batchjob.runners`). A row whose own input
fails (its text cannot be read: planning is deterministic, so every try would fail the same way)
is recorded at once.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from mvjax.batchjob.listing import ListingError, ListingLimits, Row, read_listing, resolve_voice
from mvjax.batchjob.records import (
    JOB,
    RESULTS,
    OutputError,
    ResultsLog,
    model_digest,
    output_settings,
    read_results,
    result_record,
    rewrite_results,
    row_digest,
    write_job,
)
from mvjax.batchjob.worker import DEMO_MODEL, JobSettings, Task, model_directory, reason
from mvjax.core.atomic import write_bytes
from mvjax.core.digest import file_sha256, json_sha256
from mvjax.core.errors import MvjaxError
from mvjax.inference.speaker import ShortReferenceWarning, SpeakerEncoder
from mvjax.nn.config import GPTConfig
from mvjax.serve.voices import AUDIO_SUFFIXES, VoiceLimits, VoiceRegistry
from mvjax.sources.demo import demo_speaker_audio

MAX_ATTEMPTS = 3
WORKER_DIED = "its worker process died while running it"
DEMO_VOICE = "demo"


class JobError(MvjaxError, ValueError):
    """A job refused before any work starts."""


@dataclasses.dataclass
class Plan:
    """A checked job: every row with its task and digest, and the ids that are done already."""

    out_dir: Path
    settings: JobSettings
    model_digest: str
    rows: list[Row]
    tasks: dict[str, Task]
    digests: dict[str, str]
    done: set[str]

    @property
    def pending(self) -> list[Row]:
        return [r for r in self.rows if r.id not in self.done]

    def audio_file(self, row_id: str) -> str:
        return f"{row_id}.{self.settings.fmt}"

    def tokens_file(self, row_id: str) -> str:
        return f"{row_id}.npz"


@dataclasses.dataclass
class Summary:
    rows: int
    skipped: int
    ok: int = 0
    errors: int = 0
    audio_seconds: float = 0.0
    seconds: float = 0.0


def voice_names(directory: Optional[Path], demo: bool) -> set[str]:
    """The names a voices directory offers (``<name>.npz`` or an audio file), without reading any file."""
    names = {DEMO_VOICE} if demo else set()
    if directory is not None:
        limits = VoiceLimits()
        for p in directory.iterdir():
            if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES + (".npz",) and not p.name.startswith("."):
                try:
                    names.add(limits.check_name(p.stem))
                except MvjaxError:
                    pass
    return names


def plan(listing: Path, out_dir: Path, model: str, settings: JobSettings, voices_dir: Optional[Path] = None,
         limits: ListingLimits = ListingLimits(), log: Callable[[str], None] = lambda s: None) -> Plan:
    """Check the job and find what is left to do (see the module docstring); JobError/ListingError name the
    first problem. Nothing in ``out_dir`` is written but ``job.json`` and a ``results.jsonl`` without the
    lines of rows to redo."""
    listing, out_dir = Path(listing), Path(out_dir)
    if voices_dir is not None and not Path(voices_dir).is_dir():
        raise JobError(f"--voices {voices_dir} is not a directory")
    rows = read_listing(listing, settings.options, limits)
    names = voice_names(voices_dir, demo=model == DEMO_MODEL)
    files: dict[str, Path] = {}
    for row in rows:
        try:
            _, path = resolve_voice(row.voice, listing.parent, names)
        except ListingError as exc:
            raise ListingError(f"{row.where}: {exc}") from None
        if path is not None:
            files[row.id] = path
    _check_outputs(out_dir, listing, voices_dir, files.values(), rows, settings)

    model_dir = model_directory(model)
    digest = model_digest(model_dir)
    embeddings, identities = _voices(rows, files, voices_dir, model_dir, model == DEMO_MODEL, log)
    job_digest = json_sha256({"model": digest, **output_settings(settings)})
    tasks, digests = {}, {}
    for row in rows:
        key = ("file", str(files[row.id])) if row.id in files else ("name", row.voice)
        digests[row.id] = row_digest(row, identities[key], job_digest)
        tasks[row.id] = Task(row.id, row.text, embeddings[key], row.seed, row.sampling)

    out_dir.mkdir(parents=True, exist_ok=True)
    result = Plan(out_dir, settings, digest, rows, tasks, digests, set())
    existing = read_results(out_dir)
    for row in rows:
        record = existing.get(row.id)
        if record is not None and record.get("status") == "ok" and record.get("digest") == digests[row.id] and \
                (out_dir / result.audio_file(row.id)).is_file() and \
                (not settings.save_tokens or (out_dir / result.tokens_file(row.id)).is_file()):
            result.done.add(row.id)
    redo = {r.id for r in rows if r.id in existing and r.id not in result.done}
    if redo or len(existing) != _line_count(out_dir / RESULTS):
        rewrite_results(out_dir, [r for i, r in existing.items() if i not in redo])
    opts = dataclasses.asdict(settings.options)
    write_job(out_dir, {"mvjax_version": _version(), "model": model, "model_digest": digest,
                        "listing": str(listing.resolve()), "rows": len(rows), "settings_digest": job_digest,
                        "options": {**opts, **output_settings(settings)}})
    return result


def _version() -> str:
    """The package version. Read from the package already imported (every submodule's import ran its
    ``__init__``) rather than imported: the package face sits above every layer."""
    return str(getattr(sys.modules.get("mvjax"), "__version__", "unknown"))


def _line_count(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def _check_outputs(out_dir: Path, listing: Path, voices_dir: Optional[Path], voice_files, rows: list[Row],
                   settings: JobSettings) -> None:
    """Refuse an output directory that is a file, or outputs that would overwrite an input."""
    if out_dir.exists() and not out_dir.is_dir():
        raise JobError(f"--out {out_dir} is not a directory")
    if voices_dir is not None and out_dir.resolve() == Path(voices_dir).resolve():
        raise JobError("--out is the --voices directory; give the job its own output directory")
    inputs = {listing.resolve()} | {Path(p).resolve() for p in voice_files}
    if voices_dir is not None:
        inputs |= {p.resolve() for p in Path(voices_dir).iterdir()}
    # Files are replaced by a rename (never written through a link), so only an input inside the output
    # directory itself can be hit: compare names there (cheap for a million rows).
    here = {p.name for p in inputs if p.parent == out_dir.resolve()}
    names = [RESULTS, JOB] + [f"{r.id}.{settings.fmt}" for r in rows]
    names += [f"{r.id}.npz" for r in rows] if settings.save_tokens else []
    for name in names:
        if name in here:
            raise JobError(f"the output {out_dir / name} is an input of the job (the listing or a voice); refusing to "
                           "overwrite it")


def _voices(rows, files: dict[str, Path], voices_dir, model_dir, demo: bool, log) -> tuple[dict, dict]:
    """(embedding, identity) for every voice the rows use, keyed ("name", name) or ("file", path): named
    voices from the ``--voices`` registry (audio there embedded once, its embedding cached beside it),
    files embedded by the model's speaker encoder as ``python -m mvjax.synthesize --speaker`` does."""
    encoder = []

    def the_encoder():
        if not encoder:
            encoder.append(SpeakerEncoder.load(model_dir))
        return encoder[0]

    dims = _speaker_dims(model_dir)
    used_names = {r.voice for r in rows if r.id not in files}
    embeddings, identities = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShortReferenceWarning)
        if used_names:
            registry = VoiceRegistry(voices_dir, lambda p: the_encoder().embed_file(p), dims=dims)
            if demo and DEMO_VOICE not in registry:
                registry.add_embedding(DEMO_VOICE, the_encoder().embed_audio(*demo_speaker_audio()), builtin=True)
            for name in sorted(used_names):
                if name not in registry:
                    raise JobError(f"voice {name!r} in {voices_dir} could not be loaded (see the warning above)")
                embeddings[("name", name)] = np.asarray(registry.get(name), np.float32)
                identities[("name", name)] = "voice:" + registry.voice(name).sha256
        for path in sorted(set(files.values())):
            key = ("file", str(path))
            try:
                embeddings[key] = np.asarray(the_encoder().embed_file(path), np.float32)
            except MvjaxError as exc:
                raise JobError(f"voice file {path}: {reason(exc)}") from None
            identities[key] = "file:" + file_sha256(path)
    if files:
        log(f"{len(set(files.values()))} voice file(s) embedded")
    return embeddings, identities


def _speaker_dims(model_dir: Path) -> Optional[int]:
    """The first stage's speaker embedding size (every voice must have it), from its config alone."""
    try:
        config = json.loads((Path(model_dir) / "first_stage" / "config.json").read_text())
        return GPTConfig.from_dict(config).speaker_emb_dim
    except (OSError, ValueError, TypeError, KeyError):
        return None


def run(job: Plan, runner, progress: bool = False) -> Summary:
    """Run every pending row through ``runner``, writing each result as it arrives (see the module docstring)."""
    pending = job.pending
    summary = Summary(rows=len(job.rows), skipped=len(job.done))
    started = time.perf_counter()
    reasons: dict[str, list[str]] = {r.id: [] for r in pending}
    seeds = {r.id: r.seed for r in job.rows}
    log = ResultsLog(job.out_dir)
    bar = tqdm(total=len(pending), unit="row", desc="batch", disable=not progress, dynamic_ncols=True)
    final: set[str] = set()

    def failed(row_id: str, why: str, conclusive: bool = False) -> bool:
        """Note a failure; True when it is final (recorded), False when the row goes round again."""
        reasons[row_id].append(why)
        tries = reasons[row_id]
        if not conclusive and len(tries) < MAX_ATTEMPTS and not (len(tries) >= 2 and tries[-1] == tries[-2]):
            return False
        log.append(result_record(row_id, "error", None, seeds[row_id], job.digests[row_id], error=why))
        final.add(row_id)
        summary.errors += 1
        bar.update(1)
        return True

    try:
        todo = [r.id for r in pending]
        for attempt in range(MAX_ATTEMPTS):
            if not todo:
                break
            again, seen = [], set()
            try:
                for outcome in runner([job.tasks[i] for i in todo], retry=attempt > 0):
                    if outcome.id in final or outcome.id in seen or outcome.id not in reasons:
                        continue  # a task Ray ran again after its first result arrived
                    seen.add(outcome.id)
                    if outcome.ok:
                        _write(job, outcome, log, seeds)
                        final.add(outcome.id)
                        summary.ok += 1
                        summary.audio_seconds += outcome.audio_seconds
                        bar.update(1)
                        bar.set_postfix_str(f"{summary.audio_seconds / 3600:.3f} h audio", refresh=False)
                    elif not failed(outcome.id, outcome.error, outcome.final):
                        again.append(outcome.id)
            except OutputError:
                raise
            except Exception as exc:  # noqa: BLE001 - the workers failed (Ray gave up on one): rows go round again
                why = f"worker failed: {reason(exc)}"
            else:
                why = WORKER_DIED  # the round ended, these rows' task never did
            for row_id in todo:
                if row_id not in seen and not failed(row_id, why):
                    again.append(row_id)
            todo = again
    finally:
        bar.close()
        log.close()
        summary.seconds = time.perf_counter() - started
    return summary


def _write(job: Plan, outcome, log: ResultsLog, seeds: dict) -> None:
    """An ok row's files (atomically), then its result line: a line names only a file that is complete."""
    name = job.audio_file(outcome.id)
    try:
        write_bytes(job.out_dir / name, outcome.audio)
        if job.settings.save_tokens:
            write_bytes(job.out_dir / job.tokens_file(outcome.id), outcome.tokens)
    except OSError as exc:
        raise OutputError(f"cannot write the result of {outcome.id!r} in {job.out_dir}: "
                          f"{exc.strerror or exc}") from None
    record = result_record(outcome.id, "ok", name, seeds[outcome.id], job.digests[outcome.id],
                           audio_seconds=outcome.audio_seconds, wall_seconds=outcome.wall_seconds,
                           truncated=outcome.truncated)
    record["worker"] = outcome.worker
    log.append(record)
