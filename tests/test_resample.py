"""mvjax.audio.resample against the real julius (the reference data loader's resampler).

Error analysis for the tolerances. For one output sample, julius computes ``y = sum_j k_j x_j``
over K taps in float32: each filter tap k_j is built with the same float32 operations as ours,
except sin, cos and the normalising sum, whose float32 implementations may differ by a few ulps
(relative ~4 eps per tap); the dot product accumulates K float32 roundings, at most
``K eps sum_j |k_j x_j|`` (the classic gamma_K bound), and the normalisation sum another
``K eps`` relative in the worst case. We accumulate in float64 and round once (eps / 2). So

    |ours - julius32| <= (2 K + 8) eps ||k||_1 max|x|               (worst case)
    |ours - julius64| <= 4 eps ||k||_1 max|x|                        (julius on float64 input: its
                                                                     float32 filters, float64 sums)

with eps = 2**-23 the float32 epsilon and ||k||_1 the largest per-phase sum of |taps|. The
second check is tight (measured: below 1 eps ||k||_1 max|x|) and would catch any
misplaced tap, phase or padding; the first is the rigorous bound against julius as the reference
runs it (measured: ~1.6 eps ||k||_1 max|x|).
"""

import numpy as np
import pytest

from mvjax.audio.resample import (
    ResampleError,
    filter_bank,
    reduced_rates,
    resample_frac,
    resampled_length,
)

torch = pytest.importorskip("torch")
julius = pytest.importorskip("julius")

EPS = float(np.finfo(np.float32).eps)
RATES = [16000, 22050, 44100, 48000, 8000, 11025, 32000]


def _julius(x: np.ndarray, old: int, new: int, **kw) -> np.ndarray:
    return julius.resample_frac(torch.from_numpy(x), old, new, **kw).numpy()


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("length", [1, 2, 7, 331, 4801, 30011])
def test_matches_julius(rate, length):
    rng = np.random.default_rng(rate + length)
    x = (rng.standard_normal((2, length)) * 0.4).astype(np.float32)
    ours = resample_frac(x, rate, 24000)
    ref32 = _julius(x, rate, 24000)
    ref64 = _julius(x.astype(np.float64), rate, 24000)
    assert ours.dtype == np.float32 and ours.shape == ref32.shape == ref64.shape
    if not ours.size:
        return
    bank = filter_bank(*reduced_rates(rate, 24000))
    taps, l1 = bank.shape[1], float(np.abs(bank).sum(axis=1).max())
    scale = EPS * l1 * float(np.abs(x).max())
    assert np.abs(ours - ref64).max() <= 4 * scale
    assert np.abs(ours - ref32).max() <= (2 * taps + 8) * scale


@pytest.mark.parametrize("rate", [16000, 22050, 44100])
def test_filter_bank_matches_julius(rate):
    ours = filter_bank(*reduced_rates(rate, 24000))
    ref = julius.ResampleFrac(rate, 24000).kernel.numpy()[:, 0]
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 8 * EPS * np.abs(ref).max()


def test_output_length_follows_julius_float32_rounding():
    # 80 n / 147 = 136122.993... which float32 rounds to 136123: julius keeps that extra sample.
    n = 250126
    assert resampled_length(n, 147, 80) == 136123 != (80 * n) // 147
    x = (np.random.default_rng(0).standard_normal(n) * 0.1).astype(np.float32)
    ours, ref = resample_frac(x, 44100, 24000), _julius(x, 44100, 24000)
    assert ours.shape == ref.shape == (136123,)
    bank = filter_bank(147, 80)
    scale = EPS * float(np.abs(bank).sum(axis=1).max()) * float(np.abs(x).max())
    assert np.abs(ours - ref).max() <= (2 * bank.shape[1] + 8) * scale


def test_output_length_and_full_options():
    x = np.random.default_rng(1).standard_normal((3, 1001)).astype(np.float32)
    for kw in ({"full": True}, {"output_length": 0}, {"output_length": 500}, {"output_length": 1090}):
        ours, ref = resample_frac(x, 22050, 24000, **kw), _julius(x, 22050, 24000, **kw)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    with pytest.raises(ResampleError):
        resample_frac(x, 22050, 24000, output_length=5000)
    with pytest.raises(ResampleError):
        resample_frac(x, 22050, 24000, output_length=10, full=True)


def test_leading_axes_equal_rates_and_bad_rates():
    x = np.random.default_rng(2).standard_normal((2, 3, 500)).astype(np.float32)
    ours = resample_frac(x, 16000, 24000)
    assert ours.shape == (2, 3, 750)
    np.testing.assert_array_equal(ours[1, 2], resample_frac(x[1, 2], 16000, 24000))
    assert resample_frac(x, 24000, 24000) is x  # julius returns its input unchanged
    for old, new in ((0, 24000), (16000, -1), (16000.0, 24000), (True, 24000)):
        with pytest.raises(ResampleError):
            resample_frac(x, old, new)
    with pytest.raises(ResampleError, match="common sample rate"):
        resample_frac(x, 44101, 24000)  # gcd 1: a 24000-phase filter bank, refused


def test_constant_signal_stays_constant():
    x = np.full(2000, 0.25, np.float32)
    for rate in RATES:
        y = resample_frac(x, rate, 24000)
        np.testing.assert_allclose(y, 0.25, atol=1e-6)
