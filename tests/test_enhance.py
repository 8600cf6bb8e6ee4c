"""DeepFilterNet3 through libDF: offline, aligned, and it removes noise."""

import numpy as np
import pytest
import soundfile as sf

from mvjax.audio.enhance import DF_SAMPLE_RATE, DeepFilterNet3, enhance
from mvjax.audio.features import resample


def si_sdr(estimate, reference):
    reference = reference - reference.mean()
    estimate = estimate - estimate.mean()
    scale = np.dot(estimate, reference) / np.dot(reference, reference)
    target = scale * reference
    return 10 * np.log10(np.sum(target**2) / np.sum((estimate - target) ** 2))


@pytest.fixture(scope="module")
def speech(fixtures):
    data, rate = sf.read(fixtures / "speaker" / "reference_speaker.wav", dtype="float32")
    return data[: rate * 8], rate


def test_noisy_speech_is_cleaned_and_aligned(speech):
    clean, rate = speech
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    # White noise scaled so that the noisy input sits at 5 dB SI-SDR.
    noise *= np.sqrt(np.sum(clean**2) / np.sum(noise**2) / 10 ** (5 / 10))
    noisy = clean + noise
    assert abs(si_sdr(noisy, clean) - 5.0) < 0.1
    out = enhance(noisy, rate)
    reference = resample(clean, rate, DF_SAMPLE_RATE)
    assert out.shape == reference.shape and out.dtype == np.float32
    before = si_sdr(resample(noisy, rate, DF_SAMPLE_RATE), reference)
    after = si_sdr(out, reference)  # no delay search: the output must already be aligned
    assert after >= 10.0, (before, after)


def test_length_and_silence(speech):
    enhancer = DeepFilterNet3()
    try:
        for n in (1, 479, 480, 12345):
            out = enhancer.process_48k(np.zeros(n, np.float32))
            assert out.shape == (n,) and np.all(np.isfinite(out)) and np.abs(out).max() < 1e-3
    finally:
        enhancer.close()
