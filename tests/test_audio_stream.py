"""Streaming and whole-file audio encoders (mvjax.audio.stream): round trips through soundfile."""

import io

import numpy as np
import pytest
import soundfile as sf

from mvjax.audio.stream import (
    FORMATS,
    KNOWN_FORMATS,
    AudioFormatError,
    StreamEncoder,
    content_type,
    encode,
    streams_incrementally,
    supported_formats,
)
from mvjax.core.errors import MvjaxError

RATE = 24000
# 500 Hz has a period of exactly 48 samples at 24 kHz, so an integer lag aligns a decoded tone exactly
# and the SNR below measures the codec alone, not a fractional-sample misalignment.
TONE = (0.5 * np.sin(2 * np.pi * 500 * np.arange(2 * RATE) / RATE)).astype(np.float32)
# Samples are stored as round(x * 32768) (capped at 32767) and soundfile reads n / 32768, so the only
# error is rounding, half an LSB: |decoded - x| <= 0.5 / 32768 ~ 1.5e-5 (1 / 32768 only at x = +1.0).
PCM_TOL = 0.5 / 32768
LOSSY = {"mp3", "opus"}
LOSSLESS = [f for f in FORMATS if f not in LOSSY]


def _int16(x):
    return np.clip(np.round(np.clip(x, -1, 1).astype(np.float64) * 32768), -32768, 32767).astype(np.int16)


def _decode(fmt, data, dtype="float32"):
    if fmt == "pcm":
        ints = np.frombuffer(data, "<i2")
        return ints if dtype == "int16" else ints.astype(np.float32) / 32768
    audio, rate = sf.read(io.BytesIO(data), dtype=dtype)
    assert rate == RATE
    return audio


def _stream(fmt, audio, size=4800):
    enc = StreamEncoder(fmt, RATE)
    parts = [enc.header()] + [enc.chunk(audio[i:i + size]) for i in range(0, len(audio), size)] + [enc.end()]
    return parts


def _aligned_snr(reference, decoded):
    """SNR in dB of ``decoded`` against ``reference`` at the best integer lag (codec delay)."""
    n = min(len(reference), len(decoded))
    core = slice(2400, n - 2400)  # away from the edges the codecs fade in and out
    lags = range(-48, 48)  # the tone's period: any delay is one of these modulo 48
    best = max(lags, key=lambda k: float(np.dot(reference[core], np.roll(decoded[:n], -k)[core])))
    y, x = np.roll(decoded[:n], -best)[core], reference[core]
    return 10 * np.log10(np.sum(x**2) / np.sum((y - x) ** 2)), np.corrcoef(x, y)[0, 1]


def test_formats_detected():
    assert supported_formats() == FORMATS
    assert {"wav", "pcm", "flac"} <= set(FORMATS) <= set(KNOWN_FORMATS)
    assert ("mp3" in FORMATS) == ("MP3" in sf.available_formats())
    assert ("opus" in FORMATS) == ("OPUS" in sf.available_subtypes("OGG"))
    types = {f: content_type(f) for f in FORMATS}
    assert types["wav"] == "audio/wav" and types["flac"] == "audio/flac"
    assert types["pcm"] == "audio/pcm;rate=24000;channels=1;encoding=s16le"
    assert types.get("mp3", "audio/mpeg") == "audio/mpeg" and types.get("opus", "audio/ogg") == "audio/ogg"
    assert streams_incrementally("wav") and streams_incrementally("pcm")
    assert not streams_incrementally("flac")


@pytest.mark.parametrize("fmt", ["aac", "WAVX", "", "ogg"])
def test_unknown_format_raises(fmt):
    for call in (lambda: encode(TONE, RATE, fmt), lambda: StreamEncoder(fmt, RATE),
                 lambda: content_type(fmt), lambda: streams_incrementally(fmt)):
        with pytest.raises(AudioFormatError) as info:
            call()
        assert repr(fmt) in str(info.value) and "wav, pcm, flac" in str(info.value)
        assert isinstance(info.value, MvjaxError) and isinstance(info.value, ValueError)


def test_unsupported_format_raises(monkeypatch):
    import mvjax.audio.stream as stream

    monkeypatch.setattr(stream, "FORMATS", ("wav", "pcm", "flac"))
    with pytest.raises(AudioFormatError, match="'mp3' is not supported.*wav, pcm, flac"):
        stream.encode(TONE, RATE, "mp3")
    with pytest.raises(AudioFormatError, match="'opus'"):
        stream.StreamEncoder("opus", RATE)


@pytest.mark.parametrize("fmt", LOSSLESS)
def test_lossless_round_trip(fmt):
    data = encode(TONE, RATE, fmt)
    np.testing.assert_array_equal(_decode(fmt, data, "int16"), _int16(TONE))
    decoded = _decode(fmt, data)
    assert decoded.shape == TONE.shape
    assert np.max(np.abs(decoded - TONE)) <= PCM_TOL


@pytest.mark.parametrize("fmt", sorted(LOSSY & set(FORMATS)))
def test_lossy_round_trip(fmt):
    # Measured here: mp3 ~34 dB, opus ~27 dB on this tone. 20 dB (error amplitude 10% of the signal)
    # leaves room for other encoder builds while any lost, shifted or garbled signal (< 3 dB) fails.
    for data in (encode(TONE, RATE, fmt), b"".join(_stream(fmt, TONE))):
        decoded = _decode(fmt, data)
        assert len(decoded) == len(TONE)
        snr, corr = _aligned_snr(TONE, decoded)
        assert snr > 20 and corr > 0.99, (fmt, snr, corr)


def test_wav_stream_header_and_samples():
    parts = _stream("wav", TONE)
    header = parts[0]
    assert len(header) == 44 and header[:4] == b"RIFF" and header[8:12] == b"WAVE" and header[36:40] == b"data"
    assert header[4:8] == b"\xff\xff\xff\xff" and header[40:44] == b"\xff\xff\xff\xff"
    assert parts[-1] == b""
    whole = b"".join(parts)
    # libsndfile accepts the 0xFFFFFFFF sizes as is (the data runs to the end of the file): no patching
    streamed, rate = sf.read(io.BytesIO(whole), dtype="int16")
    assert rate == RATE
    np.testing.assert_array_equal(streamed, _decode("wav", encode(TONE, RATE, "wav"), "int16"))
    assert whole[44:] == encode(TONE, RATE, "wav")[44:]


def test_pcm_stream_equals_whole():
    parts = _stream("pcm", TONE, size=1234)
    assert parts[0] == b"" and parts[-1] == b""
    assert b"".join(parts) == encode(TONE, RATE, "pcm") == _int16(TONE).astype("<i2").tobytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_stream_decodes(fmt):
    parts = _stream(fmt, TONE)
    decoded = _decode(fmt, b"".join(parts))
    assert len(decoded) == len(TONE)
    if streams_incrementally(fmt):
        assert sum(len(p) for p in parts[1:-1]) > 0  # bytes came out before end()
    else:
        assert all(p == b"" for p in parts[:-1]) and parts[-1] == encode(TONE, RATE, fmt)


def test_clipping():
    loud = np.array([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], np.float32)
    expected = np.array([-32768, -32768, -16384, 0, 16384, 32767, 32767], np.int16)
    for fmt in LOSSLESS:
        np.testing.assert_array_equal(_decode(fmt, encode(loud, RATE, fmt), "int16"), expected)
    enc = StreamEncoder("pcm", RATE)
    assert np.array_equal(np.frombuffer(enc.chunk(loud), "<i2"), expected)


@pytest.mark.skipif("opus" not in FORMATS, reason="no Opus in this libsndfile")
def test_opus_rate_rejected():
    with pytest.raises(AudioFormatError, match="opus at 22050 Hz"):
        encode(TONE, 22050, "opus")
    with pytest.raises(AudioFormatError, match="opus at 22050 Hz"):
        StreamEncoder("opus", 22050)
