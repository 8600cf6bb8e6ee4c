"""Loudness normalisation to -14 LUFS, checked with an independent meter (pyloudnorm)."""

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from mvjax.audio.loudness import integrated_loudness, normalize_loudness


@pytest.fixture(scope="module")
def speech(fixtures):
    data, rate = sf.read(fixtures / "speaker" / "reference_speaker.wav", dtype="float32")
    return data[: rate * 10], rate


@pytest.mark.parametrize("start_lufs", [-30.0, -5.0])
def test_normalised_to_minus_14(speech, start_lufs):
    audio, rate = speech
    meter = pyloudnorm.Meter(rate)
    scaled = audio * 10 ** ((start_lufs - meter.integrated_loudness(audio)) / 20)
    assert abs(meter.integrated_loudness(scaled) - start_lufs) < 0.01
    out = normalize_loudness(scaled, rate)
    assert np.abs(out).max() <= 1.0
    assert abs(meter.integrated_loudness(out.astype(np.float64)) - (-14.0)) <= 0.5


def test_meter_agrees_with_pyloudnorm(speech):
    audio, rate = speech
    for gain in (0.05, 0.3):
        ours = integrated_loudness(audio * gain, rate)
        assert abs(ours - pyloudnorm.Meter(rate).integrated_loudness(audio * gain)) < 0.1


def test_quiet_audio_is_left_alone():
    quiet = (1e-4 * np.sin(np.arange(48000) / 5)).astype(np.float32)
    np.testing.assert_array_equal(normalize_loudness(quiet, 24000), quiet)
