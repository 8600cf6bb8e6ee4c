"""Audio files in and out: reading any format (soundfile, else ffmpeg), writing WAV/FLAC/OGG atomically.

``load_audio`` reads what libsndfile reads (WAV, FLAC, OGG, MP3 ...) through soundfile and
anything else through ffmpeg when it is installed; ``write_wav`` writes the container the
extension names through :mod:`mvjax.core.atomic`. ``header_seconds`` reads a file's duration from its
header; ``wav_shortfall`` tells a WAV file cut short of the length its header gives (which libsndfile
reads as a shorter clip, silently).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf

from mvjax.core.atomic import write_bytes
from mvjax.core.errors import MvjaxError


class AudioError(MvjaxError, ValueError):
    """Audio that cannot be read or used."""


# Extensions libsndfile decodes itself; a failure to read one of these is a damaged file, not a
# missing decoder (MP3 only where libsndfile has its MPEG decoder, 1.1 and later).
NATIVE_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
# Audio containers ffmpeg decodes and libsndfile does not: only for these does a failed read suggest
# installing ffmpeg. Any other file that libsndfile cannot read is simply not readable audio.
FFMPEG_SUFFIXES = {".m4a", ".m4b", ".mp4", ".aac", ".webm", ".weba", ".opus", ".mka", ".mkv", ".mov", ".wma",
                   ".amr", ".ac3", ".3gp"}


# --- Reading -----------------------------------------------------------------------------


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 ``(channels, samples)`` and its sample rate."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if shutil.which("ffmpeg") is None:
            raise AudioError(_unreadable(path, reason)) from None
        data, rate = _load_with_ffmpeg(path)
    data = np.ascontiguousarray(data.T)
    if data.shape[-1] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: the audio holds non-finite samples (NaN or infinity)")
    return data, int(rate)


def header_seconds(path: str | os.PathLike) -> Optional[float]:
    """The duration in seconds a file's header declares, as libsndfile reads it, without decoding samples.

    Rules: any format libsndfile opens (WAV, FLAC, OGG, MP3, AIFF ...) gives its frame count over its
    sample rate; a header that declares no samples gives 0.0. None when the header cannot tell: the file
    is missing or unreadable, is not audio, is a container only ffmpeg decodes, or states a sample rate
    of 0. For a WAV cut short of its header libsndfile counts the frames the file holds, which is what
    decoding gives (:func:`wav_shortfall` tells that case).
    """
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - not a libsndfile format (ffmpeg may decode it) or damaged
        return None
    return info.frames / info.samplerate if info.samplerate > 0 and info.frames >= 0 else None


def wav_shortfall(path: str | os.PathLike) -> Optional[tuple[float, float]]:
    """(seconds the header promises, seconds the file holds) of a WAV file cut short, else None.

    libsndfile clips a WAV's frame count to what the file holds and reads that much without a word,
    so the header is walked here: the RIFF chunks up to ``data``, whose declared size is compared
    with the bytes after it. A size of 0 or 0xFFFFFFFF (a stream written without seeking back)
    promises nothing; a shortfall within one sample frame is a partial frame, not a cut file. Not a
    WAV, or a header that cannot tell (no ``fmt `` chunk before ``data``, unreadable): None.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            total = os.fstat(fh.fileno()).st_size
            byte_rate = block_align = 0
            for _ in range(64):  # a WAV has a handful of chunks before its samples
                chunk = fh.read(8)
                if len(chunk) < 8:
                    return None
                name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"data":
                    held = total - fh.tell()
                    if size in (0, 0xFFFFFFFF) or size - held < max(block_align, 1) or not byte_rate:
                        return None
                    return size / byte_rate, held / byte_rate
                if name == b"fmt " and size >= 16:
                    fmt = fh.read(16)
                    if len(fmt) < 16:
                        return None
                    byte_rate, block_align = struct.unpack("<8xIH2x", fmt)
                    size -= 16
                fh.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even length
    except OSError:
        return None  # unreadable: decoding says so
    return None


def _unreadable(path: Path, reason: str) -> str:
    """Why libsndfile could not read ``path`` (ffmpeg not installed): a damaged file of a format it reads,
    a container only ffmpeg decodes (the one case that suggests installing it), or not audio at all."""
    suffix = path.suffix.lower()
    # a libsndfile older than 1.1 has no MPEG decoder: MP3 then needs ffmpeg too
    if suffix in FFMPEG_SUFFIXES or (suffix == ".mp3" and "MP3" not in sf.available_formats()):
        return (f"{path}: cannot read this audio ({reason}); {suffix[1:].upper()} files need ffmpeg, which is not "
                "installed (install it, e.g. apt-get install ffmpeg, or convert the file to WAV)")
    if suffix in NATIVE_SUFFIXES:
        return f"{path}: not a valid {suffix[1:].upper()} file ({reason})"
    return f"{path}: not a readable audio file ({reason}; WAV, FLAC, OGG and MP3 are read)"


def _load_with_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    ffmpeg = shutil.which("ffmpeg")
    with tempfile.TemporaryDirectory(prefix="mvjax-audio-") as tmp:
        out = Path(tmp) / "decoded.wav"
        proc = subprocess.run(
            [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-vn", "-c:a", "pcm_f32le", str(out)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0 or not out.is_file():
            detail = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise AudioError(f"{path}: not a readable audio file ({detail})")
        data, rate = sf.read(str(out), dtype="float32", always_2d=True)
    return data, rate


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average the channels of ``(channels, samples)`` (a 1-D input is returned as is)."""
    audio = np.asarray(audio)
    return audio if audio.ndim == 1 else np.mean(audio, axis=tuple(range(audio.ndim - 1)))


# --- Writing -----------------------------------------------------------------------------


# Output containers by extension: (libsndfile format, subtype for 16-bit output, subtype for float output).
# FLAC has no float samples, so float output is stored as 24-bit there; Ogg holds Vorbis.
OUTPUT_FORMATS = {
    ".wav": ("WAV", "PCM_16", "FLOAT"),
    ".flac": ("FLAC", "PCM_16", "PCM_24"),
    ".ogg": ("OGG", "VORBIS", "VORBIS"),
}


def output_format(path: str | os.PathLike) -> str:
    """The container ``path``'s extension names (``WAV``, ``FLAC``, ``OGG``); AudioError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise AudioError(f"cannot write {path}: the extension must be one of {', '.join(sorted(OUTPUT_FORMATS))}")
    return OUTPUT_FORMATS[suffix][0]


def encode_audio(audio: np.ndarray, rate: int, suffix: str, subtype: str = "FLOAT") -> bytes:
    """(channels, samples) or (samples,) audio as the bytes of a whole file in the container the
    extension ``suffix`` names (``.wav``, ``.flac``, ``.ogg``); ``subtype`` as for :func:`write_wav`.
    Encoded in memory, so a writer elsewhere (the dataset job's driver) can store it atomically."""
    container, pcm16, floating = OUTPUT_FORMATS.get(suffix.lower(), (None, None, None))
    if container is None:
        output_format(f"audio{suffix}")  # raises the one-line error
    data = np.asarray(audio, np.float32)
    data = data.T if data.ndim == 2 else data
    buffer = io.BytesIO()
    try:
        sf.write(buffer, data, rate, subtype=pcm16 if subtype == "PCM_16" else floating, format=container)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioError(f"cannot encode audio as {container}: {exc}") from None
    return buffer.getvalue()


def write_wav(path: str | os.PathLike, audio: np.ndarray, rate: int, subtype: str = "FLOAT") -> None:
    """Write (channels, samples) or (samples,) audio atomically in the format its extension names.

    ``subtype`` "PCM_16" asks for 16-bit samples, "FLOAT" for float32 where the container has
    them (WAV; FLAC stores 24-bit, Ogg Vorbis is lossy either way). The file is encoded in
    memory and written through :mod:`mvjax.core.atomic`, so a full disk is an ``AudioError`` naming
    the system error and never leaves a partial file.
    """
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        output_format(path)  # raises the one-line error
    if not path.parent.is_dir():
        raise AudioError(f"cannot write {path}: directory {path.parent} does not exist")
    try:
        data = encode_audio(audio, rate, path.suffix, subtype)
    except AudioError as exc:
        raise AudioError(str(exc).replace("cannot encode audio", f"cannot encode {path}", 1)) from None
    try:
        write_bytes(path, data)
    except OSError as exc:
        raise AudioError(f"cannot write {path}: {exc.strerror or exc}") from None
