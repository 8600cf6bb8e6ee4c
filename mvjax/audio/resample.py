"""Rational-ratio sinc resampling with the semantics of julius' ``resample_frac`` (julius 0.2.x).

The reference's fine-tuning data loader brings every clip to 24 kHz with
``julius.resample_frac(wav, sr, 24000)`` at its defaults; :func:`resample_frac` reproduces it
in numpy, so prepared data needs neither torch nor julius:

- both rates are divided by their gcd, giving ``old`` input and ``new`` output samples per period;
- output phase ``i`` (of ``new``) is a windowed sinc FIR over the taps
  ``-width .. width + old - 1`` (``width = ceil(zeros * old / cutoff)``, ``cutoff = min(old, new) * rolloff``),
  evaluated at ``t = (tap / old - i / new) * cutoff``, clamped to ``[-zeros, zeros]``, windowed by
  ``cos(pi t / (2 zeros))**2`` and scaled so each phase's taps sum to 1 (a constant stays constant);
- the input is padded by repeating its edge samples (``width`` on the left, ``width + old`` on the
  right) and filtered with stride ``old``; output frame ``f``, phase ``i`` is sample ``f * new + i``;
- the result is cut to ``floor(new * n / old)`` samples (``ceil`` with ``full=True``), that ratio
  being rounded to float32 first as julius does, which for long inputs can keep one sample more.

The filter bank is built in float32 with julius' operation order; the filtering accumulates in
float64 and rounds once to float32, so it sits within float32 rounding of julius' own output
(``tests/test_resample.py`` derives the bound and checks it against julius).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from mvjax.core.errors import MvjaxError


class ResampleError(MvjaxError, ValueError):
    """Rates or lengths the resampler cannot use."""


# The filter bank has new * (2 * width + old) taps; past this (rates whose gcd is tiny, e.g.
# 44101 Hz -> 24 kHz), it would need gigabytes, as julius' would: refuse with a clear message.
MAX_FILTER_TAPS = 1 << 26
# Frames filtered per matrix product: bounds the float64 working copy of the input windows.
_CHUNK_ELEMENTS = 1 << 21


def reduced_rates(old_sr: int, new_sr: int) -> tuple[int, int]:
    """``(old, new)``: both rates divided by their greatest common divisor."""
    for name, value in (("old_sr", old_sr), ("new_sr", new_sr)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ResampleError(f"{name} must be a positive integer, got {value!r}")
    g = math.gcd(int(old_sr), int(new_sr))
    return int(old_sr) // g, int(new_sr) // g


def filter_width(old: int, new: int, zeros: int = 24, rolloff: float = 0.945) -> int:
    """Taps on each side of a phase's centre (beyond the ``old`` taps of one period)."""
    return math.ceil(zeros * old / (min(old, new) * rolloff))


def filter_bank(old: int, new: int, zeros: int = 24, rolloff: float = 0.945) -> np.ndarray:
    """The ``(new, 2 * width + old)`` float32 filters of reduced rates ``old -> new``, one row per output phase."""
    cutoff = min(old, new) * rolloff  # a Python float, as julius computes it
    width = filter_width(old, new, zeros, rolloff)
    taps = 2 * width + old
    if new * taps > MAX_FILTER_TAPS:
        raise ResampleError(
            f"resampling {old} -> {new} (after dividing by the rates' gcd) needs a {new} x {taps} filter bank; "
            "convert the audio to a common sample rate (e.g. 16, 22.05, 44.1 or 48 kHz) first"
        )
    f32 = np.float32
    tap_times = np.arange(-width, width + old, dtype=f32) / f32(old)  # float32, as in julius
    phases = np.empty((new, taps), dtype=f32)
    for i in range(new):
        t = (f32(-i / new) + tap_times) * f32(cutoff)
        t = np.clip(t, f32(-zeros), f32(zeros)) * f32(math.pi)
        window = np.cos(t / f32(zeros) / f32(2)) ** 2
        safe = np.where(t == 0, f32(1), t)
        sinc = np.where(t == 0, f32(1), np.sin(safe) / safe)
        row = sinc * window
        phases[i] = row / row.sum(dtype=f32)
    return phases


def resampled_length(length: int, old: int, new: int, full: bool = False) -> int:
    """Samples kept from an input of ``length`` at reduced rates ``old -> new`` (julius' float32 rule)."""
    ratio = float(np.float32(new * length / old))
    return int(math.ceil(ratio) if full else math.floor(ratio))


def resample_frac(x: np.ndarray, old_sr: int, new_sr: int, zeros: int = 24, rolloff: float = 0.945,
                  output_length: Optional[int] = None, full: bool = False) -> np.ndarray:
    """Resample ``x`` (time on the last axis, any leading shape) from ``old_sr`` to ``new_sr`` Hz.

    Returns float32 ``(..., n_out)`` with ``n_out = floor(new_sr * n / old_sr)`` (as julius rounds
    it; ``full=True``: the ceiling; or ``output_length`` exactly, at most the ceiling). Equal rates
    return the input unchanged, as julius does.
    """
    old, new = reduced_rates(old_sr, new_sr)
    if old == new:
        return x
    x = np.asarray(x)
    if x.ndim == 0:
        raise ResampleError("resample_frac needs at least one axis (time last)")
    length = x.shape[-1]
    longest = resampled_length(length, old, new, full=True)
    if output_length is None:
        keep = longest if full else resampled_length(length, old, new, full=False)
    else:
        if full:
            raise ResampleError("give output_length or full=True, not both")
        if isinstance(output_length, bool) or not 0 <= int(output_length) <= longest:
            raise ResampleError(f"output_length must be between 0 and {longest}, got {output_length!r}")
        keep = int(output_length)
    if length == 0:
        return np.zeros(x.shape[:-1] + (0,), np.float32)
    bank = filter_bank(old, new, zeros, rolloff)  # (new, taps)
    width = (bank.shape[1] - old) // 2
    rows = x.reshape(-1, length).astype(np.float32, copy=False)
    padded = np.concatenate(
        [np.repeat(rows[:, :1], width, axis=1), rows, np.repeat(rows[:, -1:], width + old, axis=1)], axis=1
    )
    frames = (padded.shape[1] - bank.shape[1]) // old + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, bank.shape[1], axis=1)[:, ::old][:, :frames]
    bank64 = bank.astype(np.float64).T  # (taps, new)
    out = np.empty((rows.shape[0], frames, new), np.float32)
    step = max(1, _CHUNK_ELEMENTS // bank.shape[1])
    for start in range(0, frames, step):
        chunk = windows[:, start:start + step].astype(np.float64)
        out[:, start:start + step] = chunk @ bank64
    out = out.reshape(rows.shape[0], frames * new)[:, :keep]
    return out.reshape(x.shape[:-1] + (out.shape[-1],))

