"""The job's input: a JSONL or CSV listing, one utterance per row, checked whole before any work starts.

A row has ``id`` (unique; it names the output file, so 1-128 characters of ``[A-Za-z0-9_.-]``,
not starting with a dot, and unique ignoring case, as the files would collide on a case-insensitive
filesystem), ``text``, ``voice`` (a name in the ``--voices`` directory, else an audio file path
relative to the listing) and optional ``seed`` and first-stage sampling fields (``temperature``,
``top_p``, ``top_k``, ``guidance_scale``), checked by
:class:`~mvjax.inference.options.SamplingConfig` and :class:`~mvjax.inference.options.SynthesisOptions`,
the checks the library itself applies. Any other field is refused (a misspelt ``temprature`` would
otherwise be silently ignored).

The listing is untrusted input, so reading it is bounded: its size in bytes, the number of rows
and the length of each text (:class:`ListingLimits`). The text itself is not checked here: a text
the model cannot speak is that row's error (recorded with its reason while the rest of the job goes
on), not a reason to refuse the whole listing.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from pathlib import Path
from typing import Optional

from mvjax.core.errors import MvjaxError
from mvjax.inference.options import SamplingConfig, SynthesisError, SynthesisOptions

ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "guidance_scale")
FIELDS = ("id", "text", "voice", "seed") + SAMPLING_FIELDS
REQUIRED = ("id", "text", "voice")


class ListingError(MvjaxError, ValueError):
    """A listing refused before any work starts (one line: where, and what is wrong)."""


@dataclasses.dataclass(frozen=True)
class ListingLimits:
    max_bytes: int = 256 * 2**20
    max_rows: int = 1_000_000
    max_text_chars: int = 100_000


@dataclasses.dataclass(frozen=True)
class Row:
    """One checked row. ``voice``: as the listing gives it; ``seed`` and ``sampling``: the row's own
    values over the job's defaults; ``where``: ``listing.jsonl line 3`` for messages."""

    id: str
    text: str
    voice: str
    seed: int
    sampling: SamplingConfig
    where: str


def read_listing(path: Path, defaults: SynthesisOptions, limits: ListingLimits = ListingLimits()) -> list[Row]:
    """Every row of the listing at ``path`` (``.csv``: a header naming the fields; anything else: JSONL),
    checked; a :class:`ListingError` names the first problem (and how many more there are)."""
    path = Path(path)
    if not path.is_file():
        raise ListingError(f"listing not found: {path}")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ListingError(f"{path} is {size} bytes; the limit is {limits.max_bytes} (--max-listing-mb)")
    try:
        raw = path.read_bytes()[: limits.max_bytes + 1].decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ListingError(f"cannot read {path}: {exc}") from None
    entries = _csv_entries(path, raw, limits) if path.suffix.lower() == ".csv" else _jsonl_entries(path, raw, limits)
    if not entries:
        raise ListingError(f"{path} holds no rows")
    rows, problems, seen = [], [], {}
    for where, fields in entries:
        try:
            row = _row(where, fields, defaults, limits)
        except ListingError as exc:
            problems.append(str(exc))
            continue
        key = row.id.casefold()
        if key in seen:
            other = seen[key]
            same = "" if other.id == row.id else f" (as {other.id!r}, ignoring case: their files would collide)"
            problems.append(f"{where}: id {row.id!r} is a duplicate of {other.where}{same}")
            continue
        seen[key] = row
        rows.append(row)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ListingError(problems[0] + more)
    return rows


def _jsonl_entries(path: Path, raw: str, limits: ListingLimits) -> list[tuple[str, dict]]:
    entries = []
    for n, line in enumerate(raw.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 and kin
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        if len(entries) >= limits.max_rows:
            raise ListingError(f"{where}: more than {limits.max_rows} rows (--max-rows)")
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ListingError(f"{where}: not a JSON object ({exc.msg})") from None
        if not isinstance(fields, dict):
            raise ListingError(f"{where}: not a JSON object")
        entries.append((where, fields))
    return entries


def _csv_entries(path: Path, raw: str, limits: ListingLimits) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    try:
        header = reader.fieldnames or []
        missing = [f for f in REQUIRED if f not in header]
        if missing:
            raise ListingError(f"{path.name}: the header needs the columns {', '.join(REQUIRED)} (missing: "
                               f"{', '.join(missing)})")
        entries = []
        for fields in reader:
            where = f"{path.name} line {reader.line_num}"
            if len(entries) >= limits.max_rows:
                raise ListingError(f"{where}: more than {limits.max_rows} rows (--max-rows)")
            if None in fields:
                raise ListingError(f"{where}: more cells than the header has columns")
            # An empty cell is an absent field (the job's default), as a CSV has no null.
            entries.append((where, {k: v for k, v in fields.items() if v is not None and (v != "" or k in REQUIRED)}))
    except csv.Error as exc:
        raise ListingError(f"{path.name} line {reader.line_num}: {exc}") from None
    return entries


def _row(where: str, fields: dict, defaults: SynthesisOptions, limits: ListingLimits) -> Row:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ListingError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; a row has {', '.join(FIELDS)}")
    for name in REQUIRED:
        if name not in fields:
            raise ListingError(f"{where}: no {name!r}")
    row_id = fields["id"]
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    if not isinstance(row_id, str) or not ID_RE.fullmatch(row_id) or row_id.startswith("."):
        raise ListingError(f"{where}: id {str(row_id)[:40]!r} must be 1-128 characters of letters, digits, '_', '.' "
                           "and '-', not starting with a dot (it names the output file)")
    text, voice = fields["text"], fields["voice"]
    if not isinstance(text, str):
        raise ListingError(f"{where}: text must be a string")
    if len(text) > limits.max_text_chars:
        raise ListingError(f"{where}: text is {len(text)} characters; the limit is {limits.max_text_chars} "
                           "(--max-text-chars)")
    if not isinstance(voice, str) or not voice.strip():
        raise ListingError(f"{where}: voice must be a voice name or an audio file path")
    values = {name: _number(where, name, fields[name]) for name in ("seed",) + SAMPLING_FIELDS if name in fields}
    try:
        sampling = dataclasses.replace(defaults.sampling, **{k: v for k, v in values.items() if k != "seed"})
        options = dataclasses.replace(defaults, seed=values.get("seed", defaults.seed), sampling=sampling)
    except SynthesisError as exc:
        raise ListingError(f"{where}: {exc}") from None
    return Row(row_id, text, voice.strip(), options.seed, options.sampling, where)


def _number(where: str, name: str, value):
    """A row's numeric field: JSON numbers as they are; CSV strings parsed; ``top_p``/``top_k`` may be
    null (JSON) or ``none`` (CSV): that filter off. Integers stay integers (the checks refuse 1.5 seeds)."""
    if isinstance(value, str):
        text = value.strip()
        if name in ("top_p", "top_k") and text.lower() in ("none", "null"):
            return None
        try:
            value = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            raise ListingError(f"{where}: {name} {value[:40]!r} is not a number") from None
    if value is None and name in ("top_p", "top_k"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ListingError(f"{where}: {name} must be a number, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ListingError(f"{where}: {name} must be finite")
    if name == "seed" and isinstance(value, float):
        raise ListingError(f"{where}: seed must be an integer, not {value!r}")
    return value


def resolve_voice(voice: str, listing_dir: Path, voice_names: set[str]) -> tuple[str, Optional[Path]]:
    """``("name", None)`` for a voice the voices directory names, ``("file", path)`` for an audio file
    (relative to the listing's directory); a ListingError when it is neither."""
    if voice in voice_names:
        return "name", None
    path = listing_dir / voice
    try:
        if path.is_file():
            return "file", path
    except (OSError, ValueError):  # a NUL byte, a name too long for the filesystem: not a file
        pass
    raise ListingError(f"voice {voice[:80]!r} is neither a voice of --voices nor an audio file (paths are relative "
                       "to the listing)")
