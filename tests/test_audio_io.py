"""Reading durations from audio headers: header_seconds' edge rules, and wav_shortfall beside it."""

import struct

import numpy as np
import pytest
import soundfile as sf

from mvjax.audio.io import header_seconds, wav_shortfall


def _tone(frames: int) -> np.ndarray:
    return (0.1 * np.sin(np.arange(frames) * 0.05)).astype(np.float32)


@pytest.mark.parametrize("fmt,rate,frames", [("WAV", 16000, 16000), ("FLAC", 24000, 12000), ("OGG", 16000, 32000)])
def test_whole_files_give_their_length(tmp_path, fmt, rate, frames):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, _tone(frames), rate, format=fmt)
    assert header_seconds(path) == pytest.approx(frames / rate)


def test_a_cut_wav_gives_what_the_file_holds_and_wav_shortfall_tells(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, _tone(16000), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:2000])  # a 44-byte header, then 978 of the 16000 samples promised
    assert header_seconds(path) == 978 / 16000
    assert wav_shortfall(path) == (1.0, 1956 / 32000)


def test_a_cut_flac_gives_the_length_its_header_declares(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, _tone(16000), 16000, format="FLAC")
    path.write_bytes(path.read_bytes()[:3000])
    assert header_seconds(path) == 1.0


def test_a_header_that_declares_no_samples_gives_zero(tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    assert header_seconds(empty) == 0.0
    # a WAV written as a stream, its data size left at 0: libsndfile reads no samples from it
    streamed = tmp_path / "streamed.wav"
    sf.write(streamed, _tone(16000), 16000, subtype="PCM_16")
    data = bytearray(streamed.read_bytes())
    at = data.find(b"data") + 4
    data[at:at + 4] = struct.pack("<I", 0)
    streamed.write_bytes(bytes(data))
    assert header_seconds(streamed) == 0.0 and wav_shortfall(streamed) is None


@pytest.mark.parametrize("name,data", [
    ("text.wav", b"hello, not audio" * 100),
    ("nodata.wav", b"RIFF\x10\x00\x00\x00WAVEjunk" + b"\0" * 64),  # no fmt or data chunk
    ("empty.wav", b""),
    ("clip.m4a", b"\0\0\0\x20ftypM4A " + b"\0" * 64),  # a container only ffmpeg decodes
])
def test_headers_that_cannot_tell_give_none(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    assert header_seconds(path) is None and wav_shortfall(path) is None


def test_a_missing_file_gives_none(tmp_path):
    assert header_seconds(tmp_path / "missing.wav") is None
