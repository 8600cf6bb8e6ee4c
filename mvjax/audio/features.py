"""The speaker encoder's signal processing, numerically matching librosa.

``resample`` is librosa's default (soxr, high quality, output length ``ceil(n * ratio)``);
``trim_silence``, ``stft_power`` and ``mel_filters`` reproduce ``librosa.effects.trim``,
``librosa.stft`` (centred frames, constant padding, periodic Hann window) and
``librosa.filters.mel`` (Slaney scale and normalisation).
"""

from __future__ import annotations

import numpy as np
import soxr

from mvjax.audio.io import AudioError


class StreamResampler:
    """Mono audio resampled piece by piece (soxr HQ, state kept between pieces): the pieces joined
    equal :func:`resample` of the whole signal; pass ``last=True`` with the final piece."""

    def __init__(self, orig_rate: int, target_rate: int):
        self._soxr = soxr.ResampleStream(orig_rate, target_rate, 1, dtype="float32", quality="HQ")

    def __call__(self, audio: np.ndarray, last: bool = False) -> np.ndarray:
        piece = np.asarray(audio, np.float32).reshape(-1, 1)
        return np.asarray(self._soxr.resample_chunk(piece, last=last), np.float32).reshape(-1)


def resample(audio: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """librosa.resample's default: soxr "HQ", then cut or zero-pad to ``ceil(n * target / orig)``."""
    if orig_rate == target_rate:
        return audio
    audio = np.asarray(audio)
    length = int(np.ceil(audio.shape[-1] * float(target_rate) / orig_rate))
    out = soxr.resample(audio, orig_rate, target_rate, quality="soxr_hq")
    if out.shape[-1] > length:
        out = out[..., :length]
    elif out.shape[-1] < length:
        out = np.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, length - out.shape[-1])])
    return np.asarray(out, dtype=audio.dtype)


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


class SilentAudioError(AudioError):
    """Audio with nothing in it to keep (every sample zero): no speech to take a voice from."""


def trim_silence(audio: np.ndarray, top_db: float = 20.0, frame_length: int = 2048, hop_length: int = 512):
    """librosa.effects.trim: keep frames within ``top_db`` of the loudest frame's RMS.

    Returns (trimmed audio, (start, end)). All-silent audio raises :class:`SilentAudioError`.
    """
    rms = frame_rms(audio, frame_length, hop_length)
    peak = float(np.max(rms))
    if peak <= 0.0:
        raise SilentAudioError("the audio is silent (every sample is zero)")
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
