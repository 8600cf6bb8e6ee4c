"""Speaker encoder: conversion, audio input paths, librosa equivalence, errors and the cache."""

import shutil
import warnings

import librosa
import numpy as np
import pytest
import soundfile as sf

import mvjax.audio as audio_mod
from convert_weights.convert import convert_directory
from convert_weights.mapping import ConversionError
from convert_weights.safe_pickle import load_checkpoint
from convert_weights.speaker import convert_speaker_checkpoint
from mvjax.audio import AudioError, load_audio, load_mono, mel_power_spectrogram, trim_silence
from mvjax.speaker import ShortReferenceWarning, SpeakerEncoder


@pytest.fixture(scope="module")
def encoder_dir(fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("spk") / "model"
    convert_directory(fixtures / "speaker", out)
    return out


@pytest.fixture(scope="module")
def voice(fixtures):
    """The fixture voice as float32 mono at its native rate."""
    data, rate = sf.read(fixtures / "speaker" / "reference_speaker.wav", dtype="float32")
    return data, rate


def _encoder(encoder_dir, cache_dir=None):
    return SpeakerEncoder.load(encoder_dir, cache_dir=cache_dir)


def test_fixture_embedding_matches_reference(encoder_dir, fixtures):
    sp = np.load(fixtures / "speaker" / "speaker_cases.npz")
    enc = _encoder(encoder_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ~30 s of speech: no short-reference warning
        emb = enc.embed_file(fixtures / "speaker" / "reference_speaker.wav", use_cache=False)
    assert float(emb @ sp["embedding"]) >= 0.9999
    assert np.abs(emb - sp["embedding"]).max() <= 1e-3


def test_converter_ignores_similarity_and_refuses_unknown_keys(fixtures):
    ckpt = load_checkpoint(fixtures / "speaker" / "speaker_encoder.pt")
    assert "similarity_weight" in ckpt["model_state"]
    cfg, params = convert_speaker_checkpoint(ckpt)
    assert cfg.num_layers == 3 and cfg.input_size == 40 and sorted(params) == ["linear", "lstm_0", "lstm_1", "lstm_2"]
    ckpt["model_state"]["lstm.weight_ih_l0_reverse"] = ckpt["model_state"]["lstm.weight_ih_l0"]
    with pytest.raises(ConversionError, match="weight_ih_l0_reverse"):
        convert_speaker_checkpoint(ckpt)
    ckpt = load_checkpoint(fixtures / "speaker" / "speaker_encoder.pt")
    del ckpt["model_state"]["lstm.bias_hh_l2"]
    with pytest.raises(ConversionError, match=r"lstm\.bias_hh_l2"):
        convert_speaker_checkpoint(ckpt)


def test_stereo_input_is_mixed_down_like_librosa(tmp_path, voice):
    data, rate = voice
    stereo = np.stack([data, 0.5 * data[::-1]], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    ours = load_mono(path, 16000)
    ref, _ = librosa.load(path, sr=16000)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_44k_file_and_trim_and_mel_match_librosa(tmp_path, voice):
    data, rate = voice
    up = librosa.resample(data, orig_sr=rate, target_sr=44100)
    path = tmp_path / "voice44k.flac"
    sf.write(path, up, 44100, subtype="PCM_24")
    ours = load_mono(path, 16000)
    ref, _ = librosa.load(path, sr=16000)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    trimmed, (start, end) = trim_silence(ours, top_db=20)
    ref_trim, ref_idx = librosa.effects.trim(ref, top_db=20)
    assert (start, end) == tuple(ref_idx)
    mel = mel_power_spectrogram(trimmed[:48000], 16000, 400, 160, 40)
    ref_mel = librosa.feature.melspectrogram(y=ref_trim[:48000], sr=16000, n_fft=400, hop_length=160, n_mels=40).T
    np.testing.assert_allclose(mel, ref_mel, atol=1e-4 * np.abs(ref_mel).max(), rtol=0)


def test_mp3_input(tmp_path, voice, encoder_dir, fixtures):
    data, rate = voice
    path = tmp_path / "voice.mp3"
    sf.write(path, data, rate, format="MP3")
    ours = load_mono(path, 16000)
    ref, _ = librosa.load(path, sr=16000)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    emb = _encoder(encoder_dir).embed_file(path, use_cache=False)
    wav_emb = np.load(fixtures / "speaker" / "speaker_cases.npz")["embedding"]
    assert float(emb @ wav_emb) > 0.99  # lossy coding, same voice


def test_silence_only_is_refused(tmp_path, encoder_dir):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000 * 2, np.float32), 16000)
    with pytest.raises(AudioError, match="silent"):
        _encoder(encoder_dir).embed_file(path, use_cache=False)


def test_corrupt_empty_and_nonfinite_files(tmp_path, encoder_dir, monkeypatch):
    enc = _encoder(encoder_dir)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(256)) * 4)
    monkeypatch.setattr(audio_mod.shutil, "which", lambda name: None)  # as on a machine without ffmpeg
    with pytest.raises(AudioError, match="not a valid WAV file") as info:  # damaged, not a missing decoder
        enc.embed_file(corrupt, use_cache=False)
    assert "ffmpeg" not in str(info.value)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="no audio samples"):
        enc.embed_file(empty, use_cache=False)
    bad = tmp_path / "nan.wav"
    samples = np.sin(np.arange(16000) / 10.0).astype(np.float32)
    samples[100] = np.nan
    sf.write(bad, samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="non-finite"):
        enc.embed_file(bad, use_cache=False)
    with pytest.raises(AudioError, match="not found"):
        enc.embed_file(tmp_path / "missing.wav")


def test_other_formats_go_through_ffmpeg_when_present(tmp_path, voice):
    if shutil.which("ffmpeg") is None:
        data, rate = voice
        m4a = tmp_path / "voice.m4a"
        m4a.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(64))
        with pytest.raises(AudioError, match="ffmpeg, which is not installed"):
            load_audio(m4a)
    else:
        import subprocess

        data, rate = voice
        wav = tmp_path / "v.wav"
        sf.write(wav, data, rate)
        m4a = tmp_path / "v.m4a"
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), str(m4a)], check=True)
        decoded, decoded_rate = load_audio(m4a)
        assert decoded_rate == rate and decoded.shape[0] == 1 and abs(decoded.shape[1] - len(data)) < rate


def test_short_reference_warns_but_works(tmp_path, voice, encoder_dir):
    data, rate = voice
    path = tmp_path / "short.wav"
    sf.write(path, data[: rate * 5], rate)
    with pytest.warns(ShortReferenceWarning, match="30 s"):
        emb = _encoder(encoder_dir).embed_file(path, use_cache=False)
    assert emb.shape == (256,) and abs(np.linalg.norm(emb) - 1) < 1e-5


def test_cache_is_keyed_by_content(tmp_path, voice, encoder_dir, monkeypatch):
    data, rate = voice
    path = tmp_path / "voice.wav"
    sf.write(path, data, rate)
    enc = _encoder(encoder_dir, cache_dir=tmp_path / "cache")
    first = enc.embed_file(path)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    import mvjax.speaker as speaker_mod

    calls = []
    real = speaker_mod.load_audio
    monkeypatch.setattr(speaker_mod, "load_audio", lambda p: calls.append(p) or real(p))
    np.testing.assert_array_equal(enc.embed_file(path), first)  # served from the cache
    assert calls == []

    sf.write(path, data[::-1].copy(), rate)  # same path, new content
    changed = enc.embed_file(path)
    assert calls == [path]
    assert not np.array_equal(changed, first)
    np.testing.assert_array_equal(changed, enc.embed_file(path, use_cache=False))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
