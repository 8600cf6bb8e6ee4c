"""Band splitting with julius' ``SplitBands`` semantics (used by the diffusion band processors and EQ).

Cutoffs are evenly spaced on the O'Shaughnessy mel scale between 0 and Nyquist; each is a
Hann-windowed sinc low-pass with ``zeros`` zero crossings on each side (half length
``int(zeros / min_cutoff / 2)`` in normalised frequency), normalised to unit DC gain. The
signal is padded by replicating its edges, low-passed by every filter, and band ``i`` is
``low_i - low_{i-1}`` (the first band is the lowest low-pass, the last is the input minus
the highest). Filters are built in float32 exactly as julius builds them (the truncated
half length depends on it).
"""

from __future__ import annotations

import functools

import numpy as np


def torch_linspace_f32(start: float, end: float, count: int) -> np.ndarray:
    """torch.linspace in float32: start + i * step for the first half, end - (count - 1 - i) * step after."""
    f32 = np.float32
    start, end = f32(start), f32(end)
    step = (end - start) / f32(count - 1)
    idx = np.arange(count)
    return np.where(idx < count // 2, start + step * idx.astype(f32), end - step * (count - 1 - idx).astype(f32)).astype(f32)


def _mel_cutoffs(n_bands: int, sample_rate: float) -> np.ndarray:
    """julius.core.mel_frequencies(n_bands + 1, 0, sr / 2)[1:-1], in float32 like torch."""
    f32 = np.float32
    to_mel = lambda f: f32(2595) * np.log10(f32(1) + f32(f) / f32(700))
    mels = torch_linspace_f32(float(to_mel(f32(0.0))), float(to_mel(f32(sample_rate / 2))), n_bands + 1)
    hz = f32(700) * (np.power(f32(10), mels / f32(2595)).astype(f32) - f32(1))
    return hz.astype(f32)[1:-1]


@functools.lru_cache(maxsize=16)
def lowpass_filters(n_bands: int, sample_rate: float, zeros: float = 8.0) -> tuple[np.ndarray, int]:
    """(filters (n_bands - 1, 2 * half + 1) float32, half)."""
    f32 = np.float32
    cutoffs = [f32(c) / f32(sample_rate) for c in _mel_cutoffs(n_bands, sample_rate)]
    half = int(f32(zeros) / min(c for c in cutoffs if c > 0) / f32(2))
    n = 2 * half + 1
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / (n - 1))).astype(f32)  # symmetric Hann
    time = np.arange(-half, half + 1)
    filters = []
    for cutoff in cutoffs:
        arg = (f32(2) * cutoff * f32(np.pi) * time.astype(f32)).astype(f32)
        with np.errstate(invalid="ignore", divide="ignore"):
            sinc = np.where(arg == 0, f32(1), np.sin(arg) / arg).astype(f32)
        filt = (f32(2) * cutoff * window * sinc).astype(f32)
        filters.append((filt / filt.sum(dtype=f32)).astype(f32))
    return np.stack(filters), half


def split_bands(signal: np.ndarray, sample_rate: float, n_bands: int, zeros: float = 8.0) -> np.ndarray:
    """signal (..., T) -> float32 bands (n_bands, ..., T); the bands sum back to the signal.

    Runs on the host in float64 (an FFT product): it post-processes whole waveforms, and the
    extra precision keeps us within float32 rounding of the reference's own result.
    """
    signal = np.asarray(signal)
    if n_bands == 1:
        return signal[None].astype(np.float32)
    filters, half = lowpass_filters(n_bands, float(sample_rate), zeros)
    x = signal.astype(np.float64)
    length = x.shape[-1]
    padded = np.concatenate([np.repeat(x[..., :1], half, axis=-1), x, np.repeat(x[..., -1:], half, axis=-1)], axis=-1)
    taps = filters.shape[-1]
    size = 1 << int(np.ceil(np.log2(padded.shape[-1] + taps - 1)))
    spec = np.fft.rfft(padded, n=size)
    # torch's conv1d is a cross-correlation: convolve with the reversed filters.
    kernels = np.fft.rfft(filters[:, ::-1].astype(np.float64), n=size)
    kernels = kernels.reshape((kernels.shape[0],) + (1,) * (x.ndim - 1) + (-1,))
    lows = np.fft.irfft(spec[None] * kernels, n=size)[..., taps - 1 : taps - 1 + length]
    bands = [lows[0]] + [lows[i] - lows[i - 1] for i in range(1, lows.shape[0])] + [x - lows[-1]]
    return np.stack(bands).astype(np.float32)
