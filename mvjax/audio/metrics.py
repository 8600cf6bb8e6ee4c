"""Waveform comparison measures."""

from __future__ import annotations

import numpy as np


def si_sdr(estimate: np.ndarray, reference: np.ndarray, eps: float = 1e-20) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019) of ``estimate`` against
    ``reference`` (same shape, flattened, means removed): the energy of the estimate's projection on the
    reference over the energy of the rest. ``inf`` when they are proportional."""
    est = np.asarray(estimate, np.float64).ravel()
    ref = np.asarray(reference, np.float64).ravel()
    if est.shape != ref.shape:
        raise ValueError(f"shapes differ: {np.shape(estimate)} and {np.shape(reference)}")
    est = est - est.mean()
    ref = ref - ref.mean()
    target = ref * (est @ ref) / max(ref @ ref, eps)
    residual = est - target
    noise = residual @ residual
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(target @ target, eps) / noise))
