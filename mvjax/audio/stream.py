"""Audio encoders for the speech server: whole files and streams in wav | pcm | flac | mp3 | opus.

``encode`` turns float32 mono audio into one complete file; ``StreamEncoder`` turns it into bytes
that can be sent as they are produced (``header()``, then ``chunk(audio)`` for each piece, then
``end()``). Samples are clipped to [-1, 1] before any conversion.

Formats and what streams (``streams_incrementally``), as probed with libsndfile 1.2:

* ``pcm``  -- raw little-endian signed 16-bit samples, no header; truly incremental.
* ``wav``  -- 16-bit PCM WAV. The stream starts with a 44-byte header whose RIFF and ``data``
  sizes are 0xFFFFFFFF, the "length unknown" convention streaming WAV readers accept (libsndfile
  reads such a stream to its end, as the tests check; ffmpeg and browsers do too); raw samples follow. Truly incremental.
* ``opus`` -- Opus in an Ogg container (libsndfile's OGG format, OPUS subtype). libsndfile writes
  Ogg pages strictly forward (it never seeks), so a ``SoundFile`` on a write-only sink streams:
  ``chunk`` returns the pages completed so far (about one page per second of audio, so small
  chunks often return ``b""``), ``end`` flushes the rest. Truly incremental. Opus only accepts
  8, 12, 16, 24 or 48 kHz.
* ``flac`` -- libsndfile seeks back at close to rewrite STREAMINFO (total samples, MD5); on a
  non-seekable sink the result does not decode, so the whole file is buffered and emitted by ``end``.
* ``mp3``  -- libsndfile seeks back at close to write the Xing/LAME header; without it decoders
  misjudge the length (libsndfile read 50k of 240k samples back), so mp3 is buffered and emitted by
  ``end`` as well.

``FORMATS`` holds the formats this installation supports: mp3 needs a libsndfile built with MPEG
support, opus one with Opus support; wav, pcm and flac are always there.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

from mvjax.core.errors import MvjaxError


class AudioFormatError(MvjaxError, ValueError):
    """An output format that is unknown or not supported on this installation."""


# Every format the server knows: (libsndfile format, libsndfile subtype) for those soundfile
# encodes; wav and pcm are written here directly.
_SOUNDFILE = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
KNOWN_FORMATS = ("wav", "pcm", "flac", "mp3", "opus")
_INCREMENTAL = {"wav", "pcm", "opus"}


def _detect() -> tuple[str, ...]:
    available = sf.available_formats()
    found = []
    for fmt in KNOWN_FORMATS:
        if fmt == "pcm":
            found.append(fmt)
            continue
        container, subtype = _SOUNDFILE[fmt]
        if container in available and subtype in sf.available_subtypes(container):
            found.append(fmt)
    return tuple(found)


FORMATS: tuple[str, ...] = _detect()


def supported_formats() -> tuple[str, ...]:
    """The formats this installation can encode, in the server's order."""
    return FORMATS


def _check(fmt: str) -> str:
    name = str(fmt).lower()
    if name not in FORMATS:
        why = "not supported by this installation's libsndfile" if name in KNOWN_FORMATS else "unknown"
        raise AudioFormatError(
            f"audio format {fmt!r} is {why}; supported formats: {', '.join(FORMATS)}"
        )
    return name


def content_type(fmt: str, rate: int = 24000) -> str:
    """The HTTP Content-Type of ``fmt``.

    ``pcm`` is ``audio/pcm;rate=<rate>;channels=1;encoding=s16le`` (mono little-endian signed
    16-bit samples at ``rate`` Hz, 24000 for MetaVoice), since raw samples carry no header.
    """
    fmt = _check(fmt)
    if fmt == "pcm":
        return f"audio/pcm;rate={int(rate)};channels=1;encoding=s16le"
    return {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg"}[fmt]


def streams_incrementally(fmt: str) -> bool:
    """Whether ``StreamEncoder(fmt)`` emits audio as it goes (True) or all at ``end()`` (False)."""
    return _check(fmt) in _INCREMENTAL


def _mono(audio: np.ndarray) -> np.ndarray:
    data = np.asarray(audio, np.float32)
    if data.ndim != 1:
        if data.ndim == 2 and 1 in data.shape:
            data = data.reshape(-1)
        else:
            raise ValueError(f"expected mono audio (samples,), got shape {data.shape}")
    return np.clip(data, -1.0, 1.0)


def _int16(audio: np.ndarray) -> bytes:
    """Clipped float audio as little-endian int16 bytes: x * 32768 rounded, capped at 32767.

    The scale is the one soundfile reads int16 back with (n / 32768) and libsndfile writes FLAC
    with, so wav, pcm and flac hold identical samples and -1.0 is -32768.
    """
    return np.clip(np.round(_mono(audio).astype(np.float64) * 32768.0), -32768, 32767).astype("<i2").tobytes()


def _wav_header(rate: int, data_bytes: int) -> bytes:
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (
        b"RIFF" + struct.pack("<I", riff) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", data_bytes)
    )


def encode(audio: np.ndarray, rate: int, fmt: str) -> bytes:
    """A whole file of mono ``audio`` (float32, clipped to [-1, 1]) at ``rate`` Hz in ``fmt``."""
    fmt = _check(fmt)
    rate = int(rate)
    if fmt == "pcm":
        return _int16(audio)
    if fmt == "wav":
        samples = _int16(audio)
        return _wav_header(rate, len(samples)) + samples
    container, subtype = _SOUNDFILE[fmt]
    buffer = io.BytesIO()
    try:
        sf.write(buffer, _mono(audio), rate, subtype=subtype, format=container)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioFormatError(f"cannot encode {fmt} at {rate} Hz: {exc}") from None
    return buffer.getvalue()


class _ForwardSink:
    """A write-only, forward-only file object for soundfile: collects what is written, never seeks.

    A request to seek anywhere but the current position is recorded (and ignored), so a format
    that needs to rewrite its header is caught rather than silently corrupted.
    """

    def __init__(self) -> None:
        self.pending = bytearray()
        self.position = 0
        self.rewound = False

    def write(self, data) -> int:
        data = bytes(data)
        self.pending += data
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        # the end of what was written is the current position: the sink only moves forward
        target = offset if whence == 0 else self.position + offset
        if target != self.position:
            self.rewound = True
        return self.position

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        out = bytes(self.pending)
        self.pending.clear()
        return out


class StreamEncoder:
    """Encode mono float audio piece by piece: ``header()``, ``chunk(audio)`` ..., ``end()``.

    Concatenating everything returned makes a complete stream. For ``pcm`` and ``wav`` that is
    raw int16 (after a 0xFFFFFFFF-sized header for wav, see the module docstring); for ``opus``
    Ogg pages as libsndfile completes them; for ``flac`` and ``mp3`` nothing until ``end()``,
    which returns the whole file (``streams_incrementally`` tells which).
    """

    def __init__(self, fmt: str, rate: int) -> None:
        self.format = _check(fmt)
        self.rate = int(rate)
        self._ended = False
        self._buffered: list[np.ndarray] = []
        self._sink: _ForwardSink | None = None
        self._file = None
        if self.format == "opus":
            self._sink = _ForwardSink()
            container, subtype = _SOUNDFILE["opus"]
            try:
                self._file = sf.SoundFile(self._sink, "w", self.rate, 1, subtype, format=container)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioFormatError(f"cannot encode opus at {self.rate} Hz: {exc}") from None

    @property
    def incremental(self) -> bool:
        return self.format in _INCREMENTAL

    def header(self) -> bytes:
        """Bytes that start the stream (the wav header; for opus whatever libsndfile wrote on open)."""
        if self.format == "wav":
            return _wav_header(self.rate, 0xFFFFFFFF)
        if self._sink is not None:
            return self._sink.take()
        return b""

    def chunk(self, audio: np.ndarray) -> bytes:
        """Encode the next piece of audio; returns the bytes ready now (possibly ``b""``)."""
        if self._ended:
            raise RuntimeError("StreamEncoder.chunk after end()")
        if self.format in ("pcm", "wav"):
            return _int16(audio)
        if self._file is not None:
            self._file.write(_mono(audio))
            return self._sink.take()
        self._buffered.append(_mono(audio))
        return b""

    def end(self) -> bytes:
        """Finish the stream; returns the remaining bytes (the whole file for flac and mp3)."""
        if self._ended:
            return b""
        self._ended = True
        if self.format in ("pcm", "wav"):
            return b""
        if self._file is not None:
            self._file.close()
            if self._sink.rewound:
                raise MvjaxError(f"libsndfile tried to seek back while streaming {self.format}")
            return self._sink.take()
        audio = np.concatenate(self._buffered) if self._buffered else np.zeros(0, np.float32)
        self._buffered.clear()
        return encode(audio, self.rate, self.format)
