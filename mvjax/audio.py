"""Audio input and the speaker encoder's signal processing, numerically matching librosa.

``load_audio`` reads what libsndfile reads (WAV, FLAC, OGG, MP3 ...) through soundfile and
anything else through ffmpeg when it is installed; ``resample`` is librosa's default
(soxr, high quality, output length ``ceil(n * ratio)``); ``trim_silence``, ``stft_power``
and ``mel_filters`` reproduce ``librosa.effects.trim``, ``librosa.stft`` (centred frames,
constant padding, periodic Hann window) and ``librosa.filters.mel`` (Slaney scale and
normalisation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np


class AudioError(ValueError):
    """Audio that cannot be read or used."""


# Extensions libsndfile decodes itself; a failure to read one of these is a damaged file, not a
# missing decoder.
NATIVE_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}


# --- Reading -----------------------------------------------------------------------------


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 ``(channels, samples)`` and its sample rate."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if path.suffix.lower() in NATIVE_SUFFIXES and shutil.which("ffmpeg") is None:
            # a format libsndfile reads itself: the file is damaged, no decoder is missing
            raise AudioError(f"{path}: not a valid {path.suffix[1:].upper()} file ({reason})") from None
        data, rate = _load_with_ffmpeg(path, reason=reason)
    data = np.ascontiguousarray(data.T)
    if data.shape[-1] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: the audio holds non-finite samples (NaN or infinity)")
    return data, int(rate)


def _load_with_ffmpeg(path: Path, reason: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(
            f"{path}: cannot read this audio ({reason}); formats beyond WAV/FLAC/OGG/MP3 need ffmpeg, "
            "which is not installed (install it, e.g. apt-get install ffmpeg, or convert the file to WAV)"
        )
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


def resample(audio: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """librosa.resample's default: soxr "HQ", then cut or zero-pad to ``ceil(n * target / orig)``."""
    if orig_rate == target_rate:
        return audio
    import soxr

    audio = np.asarray(audio)
    length = int(np.ceil(audio.shape[-1] * float(target_rate) / orig_rate))
    out = soxr.resample(audio, orig_rate, target_rate, quality="soxr_hq")
    if out.shape[-1] > length:
        out = out[..., :length]
    elif out.shape[-1] < length:
        out = np.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, length - out.shape[-1])])
    return np.asarray(out, dtype=audio.dtype)


def load_mono(path: str | os.PathLike, rate: int) -> np.ndarray:
    """``librosa.load(path, sr=rate)``: float32 mono at ``rate``."""
    data, native = load_audio(path)
    return resample(to_mono(data), native, rate)


# --- Framing, silence, spectra -----------------------------------------------------------


def frame(audio: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """(n,) -> (frames, frame_length) strided view; frames = 1 + (n - frame_length) // hop."""
    count = 1 + (audio.shape[-1] - frame_length) // hop_length
    if count < 1:
        raise AudioError(f"audio of {audio.shape[-1]} samples is shorter than one frame of {frame_length}")
    return np.lib.stride_tricks.sliding_window_view(audio, frame_length)[::hop_length][:count]


def frame_rms(audio: np.ndarray, frame_length: int = 2048, hop_length: int = 512) -> np.ndarray:
    """librosa.feature.rms on a centred, zero-padded signal (float32 accumulation as librosa)."""
    padded = np.pad(audio, (frame_length // 2, frame_length // 2))
    frames = frame(padded, frame_length, hop_length)
    power = np.mean(np.abs(frames.astype(np.float32)) ** 2, axis=-1, dtype=np.float32)
    return np.sqrt(power)


def trim_silence(audio: np.ndarray, top_db: float = 20.0, frame_length: int = 2048, hop_length: int = 512):
    """librosa.effects.trim: keep frames within ``top_db`` of the loudest frame's RMS.

    Returns (trimmed audio, (start, end)). All-silent audio raises :class:`AudioError`.
    """
    rms = frame_rms(audio, frame_length, hop_length)
    peak = float(np.max(rms))
    if peak <= 0.0:
        raise AudioError("the audio is silent (every sample is zero)")
    amin = 1e-10  # amplitude_to_db: power floor amin**2 = 1e-10 on squared values
    db = 10.0 * np.log10(np.maximum(amin, rms.astype(np.float64) ** 2)) - 10.0 * np.log10(max(amin, peak**2))
    loud = np.flatnonzero(db > -top_db)
    start = int(loud[0] * hop_length)
    end = min(audio.shape[-1], int((loud[-1] + 1) * hop_length))
    return audio[start:end], (start, end)


def hann_window(length: int) -> np.ndarray:
    """Periodic Hann window (scipy.signal.get_window('hann', n, fftbins=True))."""
    n = np.arange(length)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)


def stft_power(audio: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """|STFT|^2 with centred frames and zero padding, as librosa.stft(...) ** 2: (freqs, frames)."""
    padded = np.pad(np.asarray(audio, np.float32), (n_fft // 2, n_fft // 2))
    frames = frame(padded, n_fft, hop_length)
    spectrum = np.fft.rfft(frames * hann_window(n_fft), axis=-1).astype(np.complex64)
    return (np.abs(spectrum) ** 2).T


def _hz_to_mel(freq):
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, np.float64)
    f_sp = 200.0 / 3
    mels = freq / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(freq >= min_log_hz, min_log_mel + np.log(np.maximum(freq, 1e-12) / min_log_hz) / logstep, mels)


def _mel_to_hz(mels):
    mels = np.asarray(mels, np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def mel_filters(rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """librosa.filters.mel (Slaney scale, Slaney area normalisation): float32 (n_mels, 1 + n_fft // 2)."""
    fmax = rate / 2.0 if fmax is None else fmax
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    weights = np.zeros((n_mels, fft_freqs.size), np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / widths[i]
        upper = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2 : n_mels + 2] - mel_freqs[:n_mels]))[:, None]
    return weights


def mel_power_spectrogram(audio: np.ndarray, rate: int, n_fft: int, hop_length: int, n_mels: int) -> np.ndarray:
    """librosa.feature.melspectrogram (power 2, not log): float32 (frames, n_mels)."""
    power = stft_power(audio, n_fft, hop_length)
    return (mel_filters(rate, n_fft, n_mels) @ power).astype(np.float32).T


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


def write_wav(path: str | os.PathLike, audio: np.ndarray, rate: int, subtype: str = "FLOAT") -> None:
    """Write (channels, samples) or (samples,) audio atomically in the format its extension names.

    ``subtype`` "PCM_16" asks for 16-bit samples, "FLOAT" for float32 where the container has
    them (WAV; FLAC stores 24-bit, Ogg Vorbis is lossy either way). The file is encoded in
    memory and written through :mod:`mvjax.atomic`, so a full disk is an ``AudioError`` naming
    the system error and never leaves a partial file.
    """
    import io

    import soundfile as sf

    from mvjax.atomic import write_bytes

    path = Path(path)
    container, pcm16, floating = OUTPUT_FORMATS.get(path.suffix.lower(), (None, None, None))
    if container is None:
        output_format(path)  # raises the one-line error
    data = np.asarray(audio, np.float32)
    data = data.T if data.ndim == 2 else data
    if not path.parent.is_dir():
        raise AudioError(f"cannot write {path}: directory {path.parent} does not exist")
    buffer = io.BytesIO()
    try:
        sf.write(buffer, data, rate, subtype=pcm16 if subtype == "PCM_16" else floating, format=container)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioError(f"cannot encode {path} as {container}: {exc}") from None
    try:
        write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise AudioError(f"cannot write {path}: {exc.strerror or exc}") from None
