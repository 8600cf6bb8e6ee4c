"""The output directory's books: digests, ``results.jsonl`` and ``job.json``.

``results.jsonl`` holds one line per id that has a final result: ``id``, ``status`` (``ok`` or
``error``), ``file`` (the audio file's name in the output directory), ``audio_seconds``,
``wall_seconds`` (the row's own time in its worker, model loading aside), ``seed``, ``digest`` and
``error`` (the reason, for ``error``). Only the driver writes it: each line is appended whole with
one ``write`` and flushed to disk before the next row is looked at, so a killed job leaves every
line it finished (at most a torn last line, which the next run drops). A rerun first rewrites the
file atomically without the lines of rows it is going to redo (failed, changed, or whose file is
gone), so every id has at most one line at any time.

A row's ``digest`` is a SHA-256 over what decides its output: the row (text, voice identity, seed,
first-stage sampling), the job's output-changing options (second stage, token cap, chunking,
decoder, loudness, enhancement, weight and cache storage, file format) and the model. Scheduling
options (batch size, batching, engine steps, workers) are left out: tokens do not depend on them,
so a rerun with other ones reuses what is done.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from mvjax.core.atomic import atomic_path, write_bytes
from mvjax.core.digest import json_sha256
from mvjax.core.errors import MvjaxError
from mvjax.io.checkpoint import read_manifest

RESULTS = "results.jsonl"
JOB = "job.json"
MAX_RESULT_LINE = 1 << 16  # a longer line in results.jsonl is not one of ours: dropped


class OutputError(MvjaxError, OSError):
    """A result that cannot be written (a full disk): the job stops; a rerun continues it."""




def model_digest(model_dir: Path) -> str:
    """The converted model's identity: the digest of each component's parameters and its config, as the
    converter recorded them in ``manifest.json`` (not its timestamps or paths)."""
    return json_sha256(read_manifest(model_dir).get("components", {}))


def output_settings(settings) -> dict:
    """The job settings that change a row's output (see the module docstring), as plain values."""
    opts = settings.options
    return {"stage2_temperature": opts.stage2_temperature, "stage2_top_k": opts.stage2_top_k,
            "max_new_tokens": opts.max_new_tokens, "long_form": opts.long_form, "decoder": opts.decoder,
            "enhance": opts.enhance, "normalize": opts.normalize, "quantize": settings.quantize,
            "kv_cache": settings.kv_cache, "format": settings.fmt, "save_tokens": settings.save_tokens}


def row_digest(row, voice_identity: str, settings_digest: str) -> str:
    return json_sha256({"text": row.text, "voice": voice_identity, "seed": row.seed,
                        "sampling": dataclasses.asdict(row.sampling), "job": settings_digest})


def read_results(out_dir: Path) -> dict[str, dict]:
    """The last well-formed line per id in ``results.jsonl`` (a torn or foreign line is dropped)."""
    path = out_dir / RESULTS
    found: dict[str, dict] = {}
    if not path.is_file():
        return found
    with open(path, "rb") as fh:
        for raw in fh:
            if len(raw) > MAX_RESULT_LINE:
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str) and \
                    record.get("status") in ("ok", "error"):
                found[record["id"]] = record
    return found


def rewrite_results(out_dir: Path, keep: Iterable[dict]) -> None:
    """Replace ``results.jsonl`` (atomically) by the records ``keep``."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep).encode()
    write_bytes(out_dir / RESULTS, data)


class ResultsLog:
    """``results.jsonl`` opened for appending by the driver (the one writer)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / RESULTS
        try:
            self._fh = open(self.path, "ab")
        except OSError as exc:
            raise OutputError(f"cannot open {self.path}: {exc.strerror or exc}") from None

    def append(self, record: dict) -> None:
        try:
            self._fh.write((json.dumps(record, sort_keys=True) + "\n").encode())
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise OutputError(f"cannot append to {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        self._fh.close()


def write_job(out_dir: Path, record: dict) -> None:
    with atomic_path(out_dir / JOB, suffix=".json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def result_record(row_id: str, status: str, file: Optional[str], seed: int, digest: str, *, audio_seconds=0.0,
                  wall_seconds=0.0, error: Optional[str] = None, truncated: bool = False) -> dict:
    return {"id": row_id, "status": status, "file": file, "audio_seconds": round(float(audio_seconds), 4),
            "wall_seconds": round(float(wall_seconds), 4), "seed": int(seed), "digest": digest, "error": error,
            "truncated": bool(truncated)}
