"""Named voices for the speech server: speaker embeddings stored by name.

A voice is a unit speaker embedding ``(S,)`` with a name, the SHA-256 of the recording it came
from and its creation time. The server adds voices from uploads (``POST /v1/voices``), lists
(``GET /v1/audio/voices``) and deletes them (``DELETE /v1/voices/{name}``); a ``--voices DIR``
directory is read at start so a deployment can ship voices as files.

On disk each voice is ``DIR/<name>.npz`` holding ``embedding``, ``sha256`` and ``created`` (never
the audio), written atomically. Audio files placed in the directory (``<name>.wav|flac|ogg|mp3``)
are embedded once at start and their ``.npz`` cached beside them (re-embedded when the audio
changes). Uploads are checked in order of cost: size first, then the name, then the audio header
(duration), then decoding, then the embedding; each refusal is a :class:`VoiceError` carrying an
HTTP ``status`` and a one-line message that names no server path.

Every method is thread-safe: state and files change under one lock; decoding and embedding an
upload run outside it. The module is long because uploads and the start-up directory share one
set of checks (names, limits, embeddings) and one lock, which is clearer kept together.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mvjax.audio.features import SilentAudioError
from mvjax.audio.io import header_seconds, load_audio
from mvjax.core.atomic import atomic_path
from mvjax.core.errors import MvjaxError
from mvjax.core.scratch import make_owned_dir, sweep_orphans

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
NORM_TOLERANCE = 1e-3
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SUFFIX_RE = re.compile(r"\.[A-Za-z0-9]{1,8}")
UPLOAD_PREFIX = "mvjax-voice-"  # scratch directories of uploads being checked (mvjax.core.scratch)


# --- Errors ----------------------------------------------------------------------------------


class VoiceError(MvjaxError, ValueError):
    """A refused voice request; ``status`` is the HTTP status the server answers with."""

    status = 400


# One class per refusal, each with the HTTP status the server answers with.
class InvalidVoiceName(VoiceError): status = 400  # noqa: E701
class InvalidVoiceAudio(VoiceError): status = 400  # noqa: E701
class VoiceDurationError(VoiceError): status = 400  # noqa: E701
class VoiceNotFound(VoiceError): status = 404  # noqa: E701
class VoiceProtected(VoiceError): status = 403  # noqa: E701 (a built-in voice)
class VoiceExists(VoiceError): status = 409  # noqa: E701
class VoiceTooLarge(VoiceError): status = 413  # noqa: E701
class VoiceStoreUnavailable(VoiceError): status = 503  # noqa: E701
class VoiceStoreFull(VoiceError): status = 507  # noqa: E701


# --- Limits and records ----------------------------------------------------------------------


@dataclass(frozen=True)
class VoiceLimits:
    max_upload_bytes: int = 20 * 1000 * 1000
    max_seconds: float = 60.0
    min_seconds: float = 1.0
    max_voices: int = 1000
    max_embedding_file_bytes: int = 1 << 20  # a stored .npz larger than this is not read

    def check_name(self, name) -> str:
        """``name`` if it is 1-64 characters of ``[A-Za-z0-9_.-]`` not starting with a dot."""
        if not isinstance(name, str) or not name:
            raise InvalidVoiceName("a voice name is required")
        if len(name) > 64:
            raise InvalidVoiceName(f"voice name is {len(name)} characters long; the limit is 64")
        if not _NAME_RE.fullmatch(name):
            raise InvalidVoiceName("voice names may contain only letters, digits, '_', '.' and '-'")
        if name.startswith("."):
            raise InvalidVoiceName("voice names may not start with a dot")
        return name


@dataclass(frozen=True)
class Voice:
    name: str
    sha256: str
    created: float  # seconds since the epoch
    dims: int
    builtin: bool = False


@dataclass
class _Entry:
    voice: Voice
    embedding: np.ndarray
    source: Optional[str] = None  # an audio file in the directory the voice was embedded from


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unit_embedding(embedding, dims: Optional[int]) -> Optional[str]:
    """Why ``embedding`` is not a usable (dims,) unit vector, or None when it is."""
    if embedding.ndim != 1 or embedding.shape[0] == 0:
        return f"shape {tuple(embedding.shape)} is not a 1-D embedding"
    if dims is not None and embedding.shape[0] != dims:
        return f"has {embedding.shape[0]} dimensions, expected {dims}"
    if not np.all(np.isfinite(embedding)):
        return "holds NaN or infinite values"
    norm = float(np.linalg.norm(embedding.astype(np.float64)))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        return f"is not unit-norm (norm {norm:.4f})"
    return None


# --- The registry ----------------------------------------------------------------------------


class VoiceRegistry:
    """Named voices, persisted in ``directory`` (in memory only when it is None).

    ``embed`` turns a recording file into a (S,) float32 unit embedding (the server passes
    ``SpeakerEncoder.embed_file``). ``dims``, when given, is the embedding size every voice must
    have. Uploads are written to private temporary files under ``temp_dir`` (the system's by
    default), removed whatever happens; what a killed server left there is removed when the next
    registry starts (only directories whose owning process is gone: :mod:`mvjax.core.scratch`).
    """

    def __init__(self, directory: Optional[Path], embed: Callable[[Path], np.ndarray],
                 limits: VoiceLimits = VoiceLimits(), dims: Optional[int] = None, temp_dir: Optional[Path] = None):
        self.directory = Path(directory) if directory is not None else None
        self.embed = embed
        self.limits = limits
        self.dims = dims
        self.temp_dir = Path(temp_dir) if temp_dir is not None else None
        self._lock = threading.RLock()
        self._voices: dict[str, _Entry] = {}
        sweep_orphans(UPLOAD_PREFIX, self.temp_dir)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load_directory()

    # --- queries ---

    def __contains__(self, name) -> bool:
        with self._lock:
            return name in self._voices

    def __len__(self) -> int:
        with self._lock:
            return len(self._voices)

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            entry = self._voices.get(name)
        if entry is None:
            raise VoiceNotFound(f"no voice named {_quote(name)}")
        return entry

    def get(self, name: str) -> np.ndarray:
        """The voice's embedding (a read-only float32 array); VoiceNotFound (404) if there is none."""
        return self._entry(name).embedding

    def voice(self, name: str) -> Voice:
        return self._entry(name).voice

    def list(self) -> list[Voice]:
        """Every voice, sorted by name."""
        with self._lock:
            return [self._voices[n].voice for n in sorted(self._voices)]

    # --- changes ---

    def add(self, name: str, data: bytes, filename: str = "", replace: bool = False) -> Voice:
        """Add (or with ``replace`` overwrite) the voice ``name`` from the uploaded recording ``data``.

        The same recording under the same name again returns the stored voice unchanged.
        """
        return self.put(name, data, filename, replace)[0]

    def put(self, name: str, data: bytes, filename: str = "", replace: bool = False) -> tuple[Voice, bool]:
        """:meth:`add`, also saying whether the voice is new (False: the same recording was stored
        under ``name`` already, and nothing changed)."""
        limits = self.limits
        if len(data) > limits.max_upload_bytes:
            raise VoiceTooLarge(f"the upload is {len(data)} bytes; the limit is {limits.max_upload_bytes} bytes")
        limits.check_name(name)
        sha = _sha256(data)
        with self._lock:
            existing = self._admit(name, sha, replace)
            if existing is not None:
                return existing, False
        embedding = self._embed_upload(data, filename)
        with self._lock:
            # another request may have added the name while this one was embedding
            existing = self._admit(name, sha, replace)
            if existing is not None:
                return existing, False
            voice = Voice(name, sha, time.time(), int(embedding.shape[0]))
            self._store(name, _Entry(voice, embedding))
            return voice, True

    def embed_upload(self, data: bytes, filename: str = "") -> np.ndarray:
        """The embedding of an uploaded recording, checked as :meth:`add` checks one, not stored
        (the reference's ``POST /tts`` sends the speaker with every request)."""
        if len(data) > self.limits.max_upload_bytes:
            raise VoiceTooLarge(f"the upload is {len(data)} bytes; the limit is {self.limits.max_upload_bytes} bytes")
        return self._embed_upload(data, filename)

    def add_embedding(self, name: str, embedding, builtin: bool = True, replace: bool = False) -> Voice:
        """Add a voice from an embedding. A ``builtin`` voice (a demo voice) is kept in memory only
        and cannot be deleted or replaced; otherwise it is stored like an uploaded one."""
        self.limits.check_name(name)
        embedding = np.array(embedding, dtype=np.float32)
        problem = _unit_embedding(embedding, self.dims)
        if problem is not None:
            raise InvalidVoiceAudio(f"the embedding {problem}")
        embedding.setflags(write=False)
        sha = _sha256(embedding.tobytes())
        with self._lock:
            existing = self._admit(name, sha, replace)
            if existing is not None:
                return existing
            voice = Voice(name, sha, time.time(), int(embedding.shape[0]), builtin=builtin)
            self._store(name, _Entry(voice, embedding), persist=not builtin)
            return voice

    def delete(self, name: str) -> None:
        """Remove a voice and its file; VoiceNotFound (404); VoiceProtected (403) for a built-in voice or
        one embedded from an audio file in the directory (the operator's file: a client never deletes it)."""
        with self._lock:
            entry = self._voices.get(name)
            if entry is None:
                raise VoiceNotFound(f"no voice named {_quote(name)}")
            if entry.voice.builtin:
                raise VoiceProtected(f"voice {_quote(name)} is built in and cannot be deleted")
            if entry.source is not None:
                raise VoiceProtected(f"voice {_quote(name)} comes from an audio file in the server's voice "
                                     "directory; remove the file there to delete it")
            if self.directory is not None:
                try:
                    (self.directory / f"{name}.npz").unlink(missing_ok=True)
                except OSError as exc:
                    reason = exc.strerror or type(exc).__name__
                    raise VoiceStoreUnavailable(f"cannot delete voice {_quote(name)}: {reason}") from None
            del self._voices[name]

    # --- internals ---

    def _admit(self, name: str, sha: str, replace: bool) -> Optional[Voice]:
        """Under the lock: the stored voice when ``name`` already holds ``sha`` (idempotent add),
        None when the add may go ahead, or the refusal."""
        entry = self._voices.get(name)
        if entry is not None:
            if entry.voice.sha256 == sha:
                return entry.voice
            if entry.voice.builtin or entry.source is not None:
                raise VoiceProtected(f"voice {_quote(name)} is built in or comes from the server's voice directory "
                                     "and cannot be replaced")
            if not replace:
                raise VoiceExists(f"a different voice named {_quote(name)} exists; delete it or ask to replace it")
            return None
        if len(self._voices) >= self.limits.max_voices:
            raise VoiceStoreFull(f"the voice store is full ({self.limits.max_voices} voices)")
        return None

    def _store(self, name: str, entry: _Entry, persist: bool = True) -> None:
        """Under the lock: write ``name``'s file (atomically), then make it visible."""
        if persist and self.directory is not None:
            try:
                self._write_npz(self.directory / f"{name}.npz", entry)
            except OSError as exc:
                cls = VoiceStoreFull if getattr(exc, "errno", None) in (28, 122) else VoiceStoreUnavailable
                raise cls(f"cannot store voice {_quote(name)}: {exc.strerror or type(exc).__name__}") from None
        self._voices[name] = entry

    @staticmethod
    def _write_npz(path: Path, entry: _Entry) -> None:
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, embedding=np.asarray(entry.embedding, np.float32), sha256=np.array(entry.voice.sha256),
                         created=np.array(entry.voice.created, np.float64))

    def _embed_upload(self, data: bytes, filename: str) -> np.ndarray:
        """Write the upload to a private temporary file, check its audio and embed it."""
        suffix = Path(filename or "").suffix
        suffix = suffix.lower() if _SUFFIX_RE.fullmatch(suffix) else ".bin"
        try:
            tmp_dir = make_owned_dir(UPLOAD_PREFIX, self.temp_dir)
        except OSError as exc:
            raise VoiceStoreUnavailable(f"cannot accept the upload: {exc.strerror or type(exc).__name__}") from None
        path = Path(tmp_dir) / f"upload{suffix}"
        try:
            try:
                with open(path, "xb") as fh:
                    fh.write(data)
            except OSError as exc:
                raise VoiceStoreUnavailable(f"cannot accept the upload: {exc.strerror or type(exc).__name__}") from None
            return self._embed_file(path, "the upload")
        finally:
            path.unlink(missing_ok=True)
            try:
                os.rmdir(tmp_dir)
            except OSError:
                log.warning("could not remove a temporary upload directory")

    def _embed_file(self, path: Path, what: str) -> np.ndarray:
        """Check ``path`` is readable audio within the duration limits and embed it."""
        seconds = header_seconds(path)
        if seconds is not None:
            self._check_duration(seconds, what)
        try:
            audio, rate = load_audio(path)
        except MvjaxError:
            raise InvalidVoiceAudio(f"{what} is not an audio file this server can read") from None
        self._check_duration(audio.shape[-1] / rate, what)
        try:
            embedding = np.array(self.embed(path), dtype=np.float32)
        except SilentAudioError:
            raise InvalidVoiceAudio(f"{what} is silent (every sample is zero): a voice needs a recording of "
                                    "speech") from None
        except MvjaxError as exc:
            raise InvalidVoiceAudio(f"{what} could not be embedded ({type(exc).__name__})") from None
        problem = _unit_embedding(embedding, self.dims)
        if problem is not None:
            # the encoder, not the client, is at fault
            raise VoiceStoreUnavailable(f"the speaker encoder returned an embedding that {problem}")
        embedding.setflags(write=False)
        return embedding

    def _check_duration(self, seconds: float, what: str) -> None:
        limits = self.limits
        if seconds < limits.min_seconds:
            raise VoiceDurationError(f"{what} is {seconds:.2f} s long; a voice needs at least {limits.min_seconds:g} s")
        if seconds > limits.max_seconds:
            raise VoiceDurationError(f"{what} is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s")

    # --- the directory at start ---

    def _load_directory(self) -> None:
        directory = self.directory
        try:
            files = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
        except OSError as exc:
            raise VoiceStoreUnavailable(f"cannot read the voices directory: {exc.strerror}") from None
        usable = []
        for p in files:
            try:
                self.limits.check_name(p.stem)
                usable.append(p)
            except VoiceError as exc:
                log.warning("voices: skipping %s: %s", p.name, exc)
        files, audio_by_name = usable, {}
        for p in files:
            if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file():
                if p.stem in audio_by_name:
                    log.warning("voices: skipping %s: %s already names voice %r", p.name,
                                audio_by_name[p.stem].name, p.stem)
                    continue
                audio_by_name[p.stem] = p
        for p in files:
            if p.suffix == ".npz" and p.is_file():
                self._load_npz(p, audio_by_name.get(p.stem))
        for name, p in audio_by_name.items():
            if name not in self._voices:
                self._load_audio_file(name, p)

    def _room(self, filename: str) -> bool:
        if len(self._voices) >= self.limits.max_voices:
            log.warning("voices: skipping %s: the store is full (%d voices)", filename, self.limits.max_voices)
            return False
        return True

    def _load_npz(self, path: Path, audio: Optional[Path]) -> None:
        name, limit = path.stem, self.limits.max_embedding_file_bytes
        try:
            with zipfile.ZipFile(path) as z:  # the stored size and the unpacked size are both bounded
                size = max(path.stat().st_size, sum(i.file_size for i in z.infolist()))
            if size > limit:
                log.warning("voices: skipping %s: %d bytes is too large for an embedding", path.name, size)
                return
            with np.load(path, allow_pickle=False) as npz:
                if "embedding" not in npz.files:
                    log.warning("voices: skipping %s: it holds no 'embedding'", path.name)
                    return
                embedding = np.array(npz["embedding"], dtype=np.float32)
                sha = str(npz["sha256"]) if "sha256" in npz.files else _sha256(embedding.tobytes())
                created = float(npz["created"]) if "created" in npz.files else path.stat().st_mtime
        except Exception as exc:  # OSError, ValueError, zipfile.BadZipFile ...: a damaged file
            log.warning("voices: skipping %s: not a readable .npz file (%s)", path.name, type(exc).__name__)
            return
        problem = _unit_embedding(embedding, self.dims)
        if problem is not None:
            log.warning("voices: skipping %s: the embedding %s", path.name, problem)
            return
        if audio is not None:
            try:
                audio_sha = _sha256(audio.read_bytes())
            except OSError:
                audio_sha = None
            if audio_sha != sha:
                return  # a cache of older audio: the audio file is embedded again
        if not self._room(path.name):
            return
        embedding.setflags(write=False)
        voice = Voice(name, sha, created, int(embedding.shape[0]))
        self._voices[name] = _Entry(voice, embedding, source=audio.name if audio is not None else None)

    def _load_audio_file(self, name: str, path: Path) -> None:
        if not self._room(path.name):
            return
        try:
            size = path.stat().st_size
            if size > self.limits.max_upload_bytes:
                log.warning("voices: skipping %s: %d bytes is over the %d-byte limit", path.name, size,
                            self.limits.max_upload_bytes)
                return
            data = path.read_bytes()
            embedding = self._embed_file(path, path.name)
        except VoiceError as exc:
            log.warning("voices: skipping %s: %s", path.name, exc)
            return
        except Exception as exc:  # an unreadable file or an encoder failure must not stop the server starting
            log.warning("voices: skipping %s: %s", path.name, getattr(exc, "strerror", None) or type(exc).__name__)
            return
        entry = _Entry(Voice(name, _sha256(data), time.time(), int(embedding.shape[0])), embedding, source=path.name)
        try:
            self._write_npz(self.directory / f"{name}.npz", entry)
        except OSError as exc:
            log.warning("voices: could not cache the embedding of %s: %s", path.name, exc.strerror or exc)
        self._voices[name] = entry


def _quote(name) -> str:
    """A client-given name, quoted and shortened for a one-line message."""
    text = repr(str(name))
    return text if len(text) <= 70 else text[:67] + "...'"
