"""Band splitting with julius' ``SplitBands`` semantics (used by the diffusion band processors and EQ).

Cutoffs are evenly spaced on the O'Shaughnessy mel scale between 0 and Nyquist; each is a
Hann-windowed sinc low-pass with ``zeros`` zero crossings on each side (half length
``int(zeros / min_cutoff / 2)`` in normalised frequency), normalised to unit DC gain. The
signal is padded by replicating its edges, low-passed by every filter, and band ``i`` is
``low_i - low_{i-1}`` (the first band is the lowest low-pass, the last is the input minus
the highest).

The reference builds its filters in float32, one torch operation at a time, and that is
where the precision of the whole splitter is decided: one float32 ulp in a mel cutoff moves
the cutoff in Hz by ~3-5 ulps (``10 ** (m / 2595) - 1`` amplifies it), which moved the
32-band output by ~1e-5 on the fixtures. So every filter value here is rebuilt with the
float32 roundings torch applies, operation by operation:

* ``torch.linspace`` on CPU computes ``start + step * i`` (``end - step * (n - 1 - i)`` in
  the second half), and its AVX2/AVX512 kernels are compiled with contraction, so that is
  one fused multiply-add with a single rounding (``_fma32``; checked bit-exact against
  torch 2.13 on 400 random ranges). A torch forced to its non-vector kernels
  (``ATEN_CPU_CAPABILITY=default``) rounds twice; the fixtures were made with the fused form.
* Transcendentals (log10, pow, cos, sin) are evaluated in float64 and rounded once, i.e.
  correctly rounded float32. torch's vectorised SLEEF routines are within 1 ulp of that and
  agree on most inputs (the window's cosine differs in ~6 % of taps by one ulp).
* Arithmetic (+, -, *, /) is plain numpy float32, which is IEEE-rounded like torch's.

Those choices depend on no CPU feature or numpy build (float64 libm results are rounded to
float32, so a last-bit difference in a float64 libm cannot change them in practice). The
convolution itself runs in float64 through an FFT; the reference's float32 FFT blocks are
the remaining ~1e-6 difference, the same as julius itself run in float64.
"""

from __future__ import annotations

import functools
import math

import numpy as np

_F32 = np.float32


def _round32(value) -> np.ndarray:
    """A float64 value (or array) rounded once to float32."""
    return np.asarray(value, np.float64).astype(_F32)


def _fma32(a, b, c) -> np.ndarray:
    """float32 ``a + b * c`` with one rounding, for float32 ``a``, ``b`` and a small integer ``c``.

    ``b * c`` is exact in float64 (24-bit by < 30-bit significands); the float64 sum is exact
    whenever ``a`` and ``b * c`` lie within 29 binades of each other (always so for the
    linspaces here, whose start is 0 or a value of the same magnitude as the step sum).
    """
    return _round32(np.float64(a) + np.float64(b) * np.asarray(c, np.float64))


def torch_linspace_f32(start: float, end: float, count: int) -> np.ndarray:
    """``torch.linspace(start, end, count)`` in float32 as torch's CPU kernel computes it (fused)."""
    start, end = _F32(start), _F32(end)
    if count == 1:
        return np.array([start], _F32)
    step = _F32((end - start) / _F32(count - 1))
    idx = np.arange(count)
    first = _fma32(start, step, idx)
    second = _fma32(end, -step, count - 1 - idx)
    return np.where(idx < count // 2, first, second).astype(_F32)


def _hz_to_mel(hz) -> np.ndarray:
    """julius.core.hz_to_mel in float32: 2595 * log10(1 + f / 700)."""
    inner = (_F32(1) + (np.asarray(hz, _F32) / _F32(700))).astype(_F32)
    return (_F32(2595) * _round32(np.log10(inner.astype(np.float64)))).astype(_F32)


def _mel_to_hz(mel) -> np.ndarray:
    """julius.core.mel_to_hz in float32: 700 * (10 ** (m / 2595) - 1)."""
    power = _round32(10.0 ** (np.asarray(mel, _F32) / _F32(2595)).astype(np.float64))
    return (_F32(700) * (power - _F32(1))).astype(_F32)


def _mel_cutoffs(n_bands: int, sample_rate: float) -> np.ndarray:
    """julius.core.mel_frequencies(n_bands + 1, 0, sr / 2)[1:-1], in float32 like torch."""
    low = float(_hz_to_mel(0.0))
    high = float(_hz_to_mel(_F32(sample_rate / 2)))
    return _mel_to_hz(torch_linspace_f32(low, high, n_bands + 1))[1:-1]


def _hann_window(length: int) -> np.ndarray:
    """torch.hann_window(length, periodic=False): 0.5 - 0.5 cos(2 pi i / (length - 1)), float32 steps."""
    if length == 1:
        return np.ones(1, _F32)
    angle = (np.arange(length).astype(_F32) * _F32(2.0 * math.pi / (length - 1))).astype(_F32)
    return (_round32(np.cos(angle.astype(np.float64))) * _F32(-0.5) + _F32(0.5)).astype(_F32)


@functools.lru_cache(maxsize=16)
def lowpass_filters(n_bands: int, sample_rate: float, zeros: float = 8.0) -> tuple[np.ndarray, int]:
    """(filters (n_bands - 1, 2 * half + 1) float32, half), as julius' ``LowPassFilters`` builds them."""
    cutoffs = [_F32(c) / _F32(sample_rate) for c in _mel_cutoffs(n_bands, sample_rate)]
    half = int(_F32(zeros) / min(c for c in cutoffs if c > 0) / _F32(2))
    window = _hann_window(2 * half + 1)
    time = np.arange(-half, half + 1).astype(_F32)
    filters = []
    for cutoff in cutoffs:
        if cutoff == 0:
            filters.append(np.zeros_like(window))
            continue
        two_cutoff = _F32(2) * cutoff
        arg = (_F32(two_cutoff * _F32(math.pi)) * time).astype(_F32)
        with np.errstate(invalid="ignore", divide="ignore"):
            sinc = np.where(arg == 0, _F32(1), _round32(np.sin(arg.astype(np.float64))) / arg).astype(_F32)
        filt = ((two_cutoff * window).astype(_F32) * sinc).astype(_F32)
        filters.append((filt / _round32(filt.astype(np.float64).sum())).astype(_F32))
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
