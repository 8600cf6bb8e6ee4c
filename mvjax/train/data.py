"""Fine-tuning data formats: listings in (:func:`read_listing`), token rows and prepared splits out.

A listing is the reference's ``|``-separated CSV with an ``audio_files|captions`` header, or JSONL
with one ``{"audio": ..., "text": ...}`` object per line (chosen by extension). Relative paths
resolve against the listing's folder. A caption that is one word ending in ``.txt`` names a
caption file (read as UTF-8); any other caption is the text itself. Rows that cannot be used
come back as entries carrying the reason, so a run can skip them and say why.

A row is what the reference's data pipeline feeds the first stage: the normalised text encoded
with the first-stage tokenizer (offset included, end-of-text last), then EnCodec codebooks 1
and 2 interleaved frame by frame (codebook 2 shifted up by the codebook size), then cut or padded
with the pad id (which is also end of audio) to ``ctx_window + 1`` tokens; training reads inputs
``row[..., :-1]`` and targets ``row[..., 1:]``. :func:`build_row` builds one.

``python -m mvjax.finetune prepare`` writes a data directory:

``manifest.json``
    ``{"format": "mvjax-finetune-data", "version": 1, "model": str, "first_stage_sha256": str,
    "encodec_sha256": str, "speaker_encoder_sha256": str, "ctx_window": int, "pad_token": int,
    "codebook_size": int, "speaker_emb_dim": int,
    "splits": {"train": {"rows": n, "skipped": {reason: count}}, "val": {...}}}``
``<split>.npz`` (``train``, optionally ``val``), uncompressed, no pickles:
    ``tokens`` (N, 1, ctx_window + 1) int32, ``spk`` (N, S) float32 (unit-norm speaker
    embeddings), ``texts`` (N,) str (the captions as read), ``audio`` (N,) str (the source
    files), ``frames`` (N,) int32 (EnCodec frames of each clip).

:func:`load_split` reads one split back whole, checking it against the manifest with bounded reads;
:func:`mvjax.train.split_reader.open_split` opens one for training without reading its rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from mvjax.core.atomic import atomic_path, write_bytes
from mvjax.core.errors import MvjaxError

FORMAT = "mvjax-finetune-data"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
ARRAYS = ("tokens", "spk", "texts", "audio", "frames")
# Longest text / path a row may hold in the .npz (numpy stores str arrays as UTF-32).
MAX_STRING_CHARS = 65536
_MAX_MANIFEST_BYTES = 1 << 20
NPY_HEADER_BYTES = 1 << 16
MAX_CAPTION_BYTES = 1 << 20
LISTING_SUFFIXES = (".csv", ".jsonl")
CSV_HEADER = ["audio_files", "captions"]


class DataError(MvjaxError, ValueError):
    """A prepared data directory (or one of its rows) that cannot be used."""


class MissingSplitError(DataError, FileNotFoundError):
    """The data directory holds no such split (``val`` is optional)."""


# --- Rows -----------------------------------------------------------------------------------


def interleave_codebooks(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """codes (n_q >= 2, F) -> (2F,): c1[0], c2[0] + codebook_size, c1[1], c2[1] + codebook_size, ..."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] < 2:
        raise DataError(f"codes must be (codebooks >= 2, frames), got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise DataError(f"codes must be integers, got {codes.dtype}")
    first, second = codes[0].astype(np.int64), codes[1].astype(np.int64)
    if first.size and (min(first.min(), second.min()) < 0 or max(first.max(), second.max()) >= codebook_size):
        raise DataError(f"codes outside [0, {codebook_size}) in the first two codebooks")
    out = np.empty(2 * codes.shape[1], np.int64)
    out[0::2] = first
    out[1::2] = second + codebook_size
    return out


def row_length(text_tokens: int, frames: int) -> int:
    """Tokens of an uncut row: the text ids then two audio tokens per frame."""
    return int(text_tokens) + 2 * int(frames)


def fits(text_tokens: int, frames: int, ctx_window: int) -> bool:
    """Whether a row keeps all its audio and at least one end-of-audio (pad) token within ``ctx_window + 1``."""
    return row_length(text_tokens, frames) + 1 <= ctx_window + 1


def build_row(text_tokens: Sequence[int] | np.ndarray, codes: np.ndarray, ctx_window: int, pad_token: int,
              codebook_size: int) -> np.ndarray:
    """One training row, (1, ctx_window + 1) int32.

    ``text_tokens``: the encoded normalised text (model ids, end-of-text last); ``codes``:
    EnCodec codes (n_q >= 2, F), of which codebooks 1 and 2 are used. A row longer than
    ``ctx_window + 1`` is cut there (the reference's truncation: its audio then has no end);
    a shorter one is padded with ``pad_token``.
    """
    if isinstance(ctx_window, bool) or int(ctx_window) < 1:
        raise DataError(f"ctx_window must be a positive integer, got {ctx_window!r}")
    ctx_window = int(ctx_window)
    text = np.asarray(text_tokens, dtype=np.int64).reshape(-1)
    row = np.concatenate([text, interleave_codebooks(codes, codebook_size)])
    out = np.full(ctx_window + 1, pad_token, dtype=np.int64)
    keep = min(row.size, ctx_window + 1)
    out[:keep] = row[:keep]
    if out.size and (out.min() < 0 or out.max() > np.iinfo(np.int32).max):
        raise DataError("token ids outside the int32 range")
    return out.astype(np.int32)[None]


# --- Listings ------------------------------------------------------------------------------


class ListingError(MvjaxError, ValueError):
    """A listing file that cannot be read at all (missing, unknown format, bad header)."""


@dataclass(frozen=True)
class Entry:
    """One row of a listing: where it is, its audio file and text, or why it cannot be used."""

    where: str  # "train.csv line 3"
    audio: Optional[Path] = None
    text: Optional[str] = None
    caption_file: Optional[Path] = None  # the .txt the text came from (None: the caption is the text)
    problem: Optional[tuple[str, str]] = None  # (reason key, detail)


def _caption(raw: str, base: Path) -> tuple[Optional[str], Optional[Path], Optional[tuple[str, str]]]:
    """(text, caption file, problem) of a caption field."""
    stripped = raw.strip()
    if not (stripped.lower().endswith(".txt") and len(stripped.split()) == 1):
        return raw, None, None
    path = Path(os.path.abspath(base / stripped))
    if not path.is_file():
        return None, path, ("missing caption file", f"caption file not found: {path}")
    try:
        if path.stat().st_size > MAX_CAPTION_BYTES:
            return None, path, ("unreadable caption file", f"{path} is over {MAX_CAPTION_BYTES} bytes")
        return path.read_text(encoding="utf-8").strip(), path, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, path, ("unreadable caption file", f"{path}: {str(exc).splitlines()[0]}")


def _entry(where: str, audio, caption, base: Path) -> Entry:
    if not isinstance(audio, str) or not isinstance(caption, str) or not audio.strip():
        return Entry(where, problem=("malformed row", "expected an audio path and a caption"))
    audio_path = Path(os.path.abspath(base / audio.strip()))
    text, caption_file, problem = _caption(caption, base)
    if problem is None and not audio_path.is_file():
        problem = ("missing audio", f"audio file not found: {audio_path}")
    return Entry(where, audio_path, text, caption_file, problem)


def read_listing(path: str | os.PathLike) -> list[Entry]:
    """The rows of a ``.csv`` (``audio_files|captions``) or ``.jsonl`` (``{"audio", "text"}``) listing.

    An empty file, or one with no row (a CSV with only its header), is a :class:`ListingError`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LISTING_SUFFIXES:
        raise ListingError(f"{path}: a listing must be a .csv or a .jsonl file")
    if not path.is_file():
        raise ListingError(f"listing not found: {path}")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ListingError(f"{path}: cannot read it as UTF-8 text ({str(exc).splitlines()[0]})") from None
    if not content.strip():
        raise ListingError(f"{path}: the listing is empty")
    base = path.parent
    entries = []
    if suffix == ".csv":
        rows = csv.reader(io.StringIO(content, newline=""), delimiter="|")
        header = next(rows, None)
        if header is None or [h.strip() for h in header] != CSV_HEADER:
            raise ListingError(f"{path}: the first line must be the header {'|'.join(CSV_HEADER)}, got {header!r}")
        for row in rows:
            where = f"{path.name} line {rows.line_num}"
            if not row or all(not field.strip() for field in row):
                continue
            entries.append(_entry(where, *row, base) if len(row) == 2 else
                           Entry(where, problem=("malformed row", f"{len(row)} fields, expected 2")))
    else:
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                entries.append(Entry(where, problem=("malformed row", f"not JSON ({exc.msg})")))
                continue
            if not isinstance(obj, dict):
                entries.append(Entry(where, problem=("malformed row", "not a JSON object")))
                continue
            entries.append(_entry(where, obj.get("audio"), obj.get("text"), base))
    if not entries:
        raise ListingError(f"{path}: the listing has no rows" + (" (only the header)" if suffix == ".csv" else ""))
    return entries


# --- Writing --------------------------------------------------------------------------------


def write_split(path: str | os.PathLike, tokens: np.ndarray, spk: np.ndarray, texts: Sequence[str],
                audio: Sequence[str], frames: Sequence[int]) -> None:
    """Write one split's arrays to ``path`` (an .npz, atomically), checking they agree."""
    arrays = {
        "tokens": np.asarray(tokens, np.int32),
        "spk": np.asarray(spk, np.float32),
        "texts": np.asarray(list(texts), dtype=str),
        "audio": np.asarray(list(audio), dtype=str),
        "frames": np.asarray(list(frames), np.int32),
    }
    n = arrays["tokens"].shape[0]
    if arrays["tokens"].ndim != 3 or arrays["tokens"].shape[1] != 1 or arrays["spk"].ndim != 2:
        raise DataError(f"tokens must be (N, 1, L) and spk (N, S); got {arrays['tokens'].shape}, {arrays['spk'].shape}")
    for name, value in arrays.items():
        if value.shape[0] != n:
            raise DataError(f"{name} has {value.shape[0]} rows, tokens has {n}")
    for name in ("texts", "audio"):  # an empty split still gets a str dtype numpy can load without pickles
        if arrays[name].size == 0:
            arrays[name] = np.zeros(0, dtype="<U1")
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def write_manifest(data_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    write_bytes(Path(data_dir) / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


# --- Reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One split of a prepared data directory (arrays as documented in this module)."""

    name: str
    tokens: np.ndarray  # (N, 1, ctx_window + 1) int32
    spk: np.ndarray  # (N, S) float32
    texts: np.ndarray  # (N,) str
    audio: np.ndarray  # (N,) str
    frames: np.ndarray  # (N,) int32
    manifest: dict

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def ctx_window(self) -> int:
        return int(self.manifest["ctx_window"])


def read_data_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared data directory, checked for format, version and field types."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    if not path.is_file():
        raise DataError(f"{data_dir} has no {MANIFEST}: not a prepared data directory "
                        "(run python -m mvjax.finetune prepare)")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise DataError(f"{path} is too large to be a data manifest")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: unsupported version {manifest.get('version')!r} (this mvjax reads {VERSION})")
    for key in ("ctx_window", "pad_token", "codebook_size", "speaker_emb_dim"):
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key != "pad_token" else 0):
            raise DataError(f"{path}: {key} must be a non-negative integer, got {value!r}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise DataError(f"{path}: no train split listed")
    for name, entry in splits.items():
        rows = entry.get("rows") if isinstance(entry, dict) else None
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise DataError(f"{path}: split {name!r} has no valid row count")
    return manifest


def check_members(path: Path, rows: int, width: int, emb: int) -> None:
    """Refuse an .npz whose members are missing, extra, or larger than the manifest allows (before loading)."""
    limits = {
        "tokens": rows * width * 4,
        "spk": rows * emb * 4,
        "texts": rows * MAX_STRING_CHARS * 4,
        "audio": rows * MAX_STRING_CHARS * 4,
        "frames": rows * 4,
    }
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    names = {name[:-4] if name.endswith(".npy") else name for name in infos}
    if names != set(ARRAYS):
        missing, extra = set(ARRAYS) - names, names - set(ARRAYS)
        detail = f"lacks {', '.join(sorted(missing))}" if missing else f"has unexpected {', '.join(sorted(extra))}"
        raise DataError(f"{path}: {detail}")
    for name, limit in limits.items():
        info = infos.get(f"{name}.npy") or infos[name]
        if info.file_size > limit + NPY_HEADER_BYTES:
            raise DataError(f"{path}: {name} is {info.file_size} bytes, more than {rows} rows can hold")


def split_file(data_dir: Path, split: str) -> tuple[dict, Path]:
    """(manifest, path) of split ``split``: MissingSplitError when the manifest or the disk lacks it."""
    manifest = read_data_manifest(data_dir)
    if split not in manifest["splits"]:
        have = ", ".join(sorted(manifest["splits"]))
        raise MissingSplitError(f"{data_dir} has no {split!r} split (has: {have})")
    path = data_dir / f"{split}.npz"
    if not path.is_file():
        raise MissingSplitError(f"{path} is missing")
    return manifest, path


def checked_layout(data_dir: str | os.PathLike, split: str) -> tuple[dict, Path, dict]:
    """(manifest, path, expected) of split ``split``, its zip members checked against the manifest
    (:func:`check_members`, before any array is read); ``expected``: name -> (shape, dtype) of the
    numeric arrays the manifest implies."""
    manifest, path = split_file(Path(data_dir), split)
    rows = manifest["splits"][split]["rows"]
    width = manifest["ctx_window"] + 1
    emb = manifest["speaker_emb_dim"]
    check_members(path, rows, width, emb)
    expected = {
        "tokens": ((rows, 1, width), np.dtype(np.int32)),
        "spk": ((rows, emb), np.dtype(np.float32)),
        "frames": ((rows,), np.dtype(np.int32)),
    }
    return manifest, path, expected


def load_split(data_dir: str | os.PathLike, split: str = "train") -> Split:
    """Read split ``split`` of a prepared data directory whole, checking shapes, dtypes and values.

    For callers that want every array in memory: tests and tools on small splits, and the training
    loop's validation split (every process evaluates all of it, and it is small: ``prepare`` holds out
    a few rows). Training rows go through :func:`mvjax.train.split_reader.open_split` instead, which reads no
    row until asked."""
    manifest, path, expected = checked_layout(data_dir, split)
    rows = manifest["splits"][split]["rows"]
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ARRAYS}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for name, (shape, dtype) in expected.items():
        value = arrays[name]
        if value.shape != shape or value.dtype != dtype:
            raise DataError(f"{path}: {name} is {value.dtype}{list(value.shape)}, expected "
                            f"{np.dtype(dtype)}{list(shape)}")
    for name in ("texts", "audio"):
        value = arrays[name]
        if value.shape != (rows,) or value.dtype.kind != "U":
            raise DataError(f"{path}: {name} must be ({rows},) str, got {value.dtype}{list(value.shape)}")
    tokens = arrays["tokens"]
    if tokens.size and tokens.min() < 0:
        raise DataError(f"{path}: negative token ids")
    if not np.all(np.isfinite(arrays["spk"])):
        raise DataError(f"{path}: non-finite speaker embeddings")
    if rows and arrays["frames"].min() < 1:
        raise DataError(f"{path}: a row has no audio frames")
    return Split(name=split, manifest=manifest, **arrays)


