"""Loudness as the reference writes its outputs (audiocraft ``audio_write(strategy="loudness")``).

Integrated loudness follows ITU-R BS.1770-4 as torchaudio's ``Loudness`` (which the
reference uses) measures it: K-weighting by a high-shelf biquad (+4 dB, 1500 Hz,
Q 1/sqrt(2)) and a high-pass biquad (38 Hz, Q 0.5) in the audio-EQ-cookbook form at the
signal's own rate; mean square in 400 ms blocks every 100 ms; channel weights 1, 1, 1,
1.41, 1.41; an absolute gate at -70 LUFS, then a relative gate 10 LU below the loudness of
the blocks that passed; LUFS = -0.691 + 10 log10(energy). One deliberate difference:
torchaudio clamps each filter's output to [-1, 1], which under-measures input above full
scale by several dB; we do not clamp.

``normalize_loudness`` brings the signal to -14 LUFS with ``tanh`` soft clipping and a final
clamp to [-1, 1]; signals whose RMS is below 2e-3 are left untouched. The reference applies
the -14 LUFS gain once and then ``tanh``, which lands about 1 LU low on audio with a high
crest factor (tanh eats the peaks); we refine the gain a few times so that the soft-clipped
result itself measures -14 LUFS.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import lfilter

TARGET_LUFS = -14.0
ENERGY_FLOOR = 2e-3
MAX_REFINEMENTS = 8
_CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)


def _high_shelf(rate: float, gain_db: float = 4.0, freq: float = 1500.0, q: float = 1 / math.sqrt(2)):
    w0 = 2 * math.pi * freq / rate
    alpha = math.sin(w0) / 2 / q
    a = math.exp(gain_db / 40 * math.log(10))
    t1, t2, t3 = 2 * math.sqrt(a) * alpha, (a - 1) * math.cos(w0), (a + 1) * math.cos(w0)
    b = [a * ((a + 1) + t2 + t1), -2 * a * ((a - 1) + t3), a * ((a + 1) + t2 - t1)]
    den = [(a + 1) - t2 + t1, 2 * ((a - 1) - t3), (a + 1) - t2 - t1]
    return np.array(b) / den[0], np.array(den) / den[0]


def _high_pass(rate: float, freq: float = 38.0, q: float = 0.5):
    w0 = 2 * math.pi * freq / rate
    alpha = math.sin(w0) / 2 / q
    b = [(1 + math.cos(w0)) / 2, -1 - math.cos(w0), (1 + math.cos(w0)) / 2]
    den = [1 + alpha, -2 * math.cos(w0), 1 - alpha]
    return np.array(b) / den[0], np.array(den) / den[0]


def integrated_loudness(audio: np.ndarray, rate: int) -> float:
    """LUFS of (channels, samples) or (samples,) audio; -inf when every block is gated out."""
    x = np.atleast_2d(np.asarray(audio, np.float64))
    if x.shape[0] > len(_CHANNEL_WEIGHTS):
        raise ValueError(f"at most {len(_CHANNEL_WEIGHTS)} channels are weighted by BS.1770")
    for b, a in (_high_shelf(rate), _high_pass(rate)):
        x = lfilter(b, a, x, axis=-1)
    block = int(round(0.4 * rate))
    step = int(round(block * 0.25))
    if x.shape[-1] < block:
        return float("-inf")
    count = 1 + (x.shape[-1] - block) // step
    squares = np.square(x)
    csum = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(squares, axis=-1)], axis=-1)
    starts = np.arange(count) * step
    energy = (csum[:, starts + block] - csum[:, starts]) / block  # (channels, blocks)
    weights = np.array(_CHANNEL_WEIGHTS[: x.shape[0]])[:, None]
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10 * np.log10(np.sum(weights * energy, axis=0))
    gate = block_lufs > -70.0
    if not gate.any():
        return float("-inf")
    relative = -0.691 + 10 * np.log10(np.sum(weights[:, 0] * energy[:, gate].mean(axis=1))) - 10.0
    gate &= block_lufs > relative
    return float(-0.691 + 10 * np.log10(np.sum(weights[:, 0] * energy[:, gate].mean(axis=1))))


def normalize_loudness(audio: np.ndarray, rate: int, target_lufs: float = TARGET_LUFS, compressor: bool = True,
                       energy_floor: float = ENERGY_FLOOR) -> np.ndarray:
    """Gain to ``target_lufs``, then tanh soft clipping and a clamp to [-1, 1]; quiet signals pass unchanged."""
    x = np.asarray(audio, np.float32)
    gain_db = loudness_gain_db(x, rate, target_lufs, compressor, energy_floor)
    return x if gain_db is None else apply_gain(x, gain_db, compressor)


def loudness_gain_db(audio: np.ndarray, rate: int, target_lufs: float = TARGET_LUFS, compressor: bool = True,
                     energy_floor: float = ENERGY_FLOOR) -> float | None:
    """The gain :func:`normalize_loudness` applies to ``audio`` (with the soft clipper's correction),
    or None for a signal too quiet to measure. A stream applies the gain of its first piece to every
    later piece (:func:`apply_gain`), so its loudness does not jump between pieces."""
    x = np.asarray(audio, np.float32)
    if float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) < energy_floor:
        return None
    loudness = integrated_loudness(x, rate)
    if not np.isfinite(loudness):
        return None
    gain_db = target_lufs - loudness
    if compressor:
        # loudness(tanh(g x)) rises monotonically with g: a few corrections converge.
        for _ in range(MAX_REFINEMENTS):
            error = target_lufs - integrated_loudness(apply_gain(x, gain_db, compressor), rate)
            if abs(error) < 0.05:
                break
            gain_db += error
    return float(gain_db)


def apply_gain(audio: np.ndarray, gain_db: float, compressor: bool = True) -> np.ndarray:
    """``audio`` times ``gain_db``, through the tanh soft clipper, clamped to [-1, 1]."""
    y = np.asarray(audio, np.float32) * np.float32(10.0 ** (gain_db / 20.0))
    if compressor:
        y = np.tanh(y)
    return np.clip(y, -1.0, 1.0).astype(np.float32)
