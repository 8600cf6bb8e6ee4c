"""The synthesize / vocode CLIs against careless use: every path written is protected, every number
checked before loading, formats follow the extension, failures leave nothing behind."""

import errno
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from mvjax.cli.synthesize import main
from tests.conftest import REPO

FAST = ["--decoder", "encodec", "--no-enhance", "--max-new-tokens", "8", "--quiet"]


@pytest.fixture(scope="module")
def speaker_wav(fixtures):
    return str(fixtures / "speaker" / "reference_speaker.wav")


def _one_line_error(text: str, rc: int) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("error:")]
    assert rc != 0, text
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("option, value, message", [
    ("--guidance-scale", "nan", "--guidance-scale"), ("--guidance-scale", "inf", "--guidance-scale"),
    ("--temperature", "nan", "--temperature"), ("--temperature", "inf", "--temperature"),
    ("--temperature", "-0.5", "--temperature"), ("--stage2-temperature", "nan", "--stage2-temperature"),
    ("--top-p", "0", "--top-p"), ("--top-p", "1.5", "--top-p"), ("--top-p", "nan", "--top-p"),
    ("--seed", "-1", "--seed"), ("--seed", str(2**32), "--seed"), ("--max-new-tokens", "1", "--max-new-tokens"),
    ("--stage2-top-k", "-3", "--stage2-top-k"),
])
def test_numeric_options_are_refused_before_loading(capsys, tmp_path, option, value, message):
    """The model path does not even exist: the option is refused first."""
    rc = main(["--model", str(tmp_path / "no_model"), "--text", "Hi.", "--speaker-embedding", str(tmp_path / "e.npy"),
               "--out", str(tmp_path / "o.wav"), option, value])
    line = _one_line_error(capsys.readouterr().err, rc)
    assert message in line and "not found" not in line
    assert list(tmp_path.iterdir()) == []


def _copy(src, dst):
    shutil.copy(src, dst)
    return hashlib.sha256(dst.read_bytes()).hexdigest()


def test_save_tokens_never_overwrites_inputs_outputs_or_other_files(capsys, full_model, speaker_wav, tmp_path):
    voice = tmp_path / "voice.wav"
    voice_digest = _copy(speaker_wav, voice)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    out = tmp_path / "o.wav"
    for target, why in [(voice, ".npz"), (notes, ".npz"), (out, ".npz")]:
        rc = main(["--model", str(full_model), "--text", "Hi.", "--speaker", str(voice), "--out", str(out),
                   "--save-tokens", str(target), *FAST])
        assert why in _one_line_error(capsys.readouterr().err, rc)
    assert hashlib.sha256(voice.read_bytes()).hexdigest() == voice_digest
    assert notes.read_text() == "keep me" and not out.exists()


def test_batch_outputs_with_one_name_cannot_share_a_tokens_file(capsys, full_model, speaker_wav, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"text,speaker,out\nOne.,{speaker_wav},{tmp_path / 'a' / 'x.wav'}\n"
                    f"Two.,{speaker_wav},{tmp_path / 'b' / 'x.wav'}\n")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    rc = main(["--model", str(full_model), "--text-file", str(jobs), "--out", str(tmp_path / "batch"),
               "--save-tokens", str(tokens), *FAST])
    assert "x.npz" in _one_line_error(capsys.readouterr().err, rc)
    assert list(tokens.iterdir()) == [] and not (tmp_path / "batch").exists()


@pytest.mark.parametrize("suffix, container", [(".flac", "FLAC"), (".ogg", "OGG"), (".wav", "WAV")])
def test_output_format_follows_the_extension(full_model, speaker_wav, tmp_path, suffix, container):
    out = tmp_path / f"speech{suffix}"
    rc = main(["--model", str(full_model), "--text", "Hi.", "--speaker", speaker_wav, "--out", str(out), *FAST])
    assert rc == 0
    info = sf.info(str(out))
    assert info.format == container and info.samplerate == 24000 and info.frames > 0


def test_outputs_honour_the_umask(full_model, speaker_wav, tmp_path):
    out = tmp_path / "o.wav"
    tokens = tmp_path / "o.npz"
    code = ("import os, sys; os.umask(0o022); from mvjax.synthesize import main; "
            f"sys.exit(main(['--model', {str(full_model)!r}, '--text', 'Hi.', '--speaker', {speaker_wav!r}, "
            f"'--out', {str(out)!r}, '--save-tokens', {str(tokens)!r}] + {FAST!r}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out.stat().st_mode & 0o777) == 0o644 and (tokens.stat().st_mode & 0o777) == 0o644


def test_text_file_numbering_follows_lines_and_bad_lines_are_named(capsys, full_model, speaker_wav, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("First.\n\nThird.\n")
    out = tmp_path / "batch"
    rc = main(["--model", str(full_model), "--text-file", str(texts), "--speaker", speaker_wav, "--out", str(out), *FAST])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.wav", "0002.wav"]
    bad = tmp_path / "bad.txt"
    bad.write_text("Fine.\n\nNot fine \u4e16.\n")
    out2 = tmp_path / "batch2"
    rc = main(["--model", str(full_model), "--text-file", str(bad), "--speaker", speaker_wav, "--out", str(out2), *FAST])
    line = _one_line_error(capsys.readouterr().err, rc)
    assert "line 3" in line and "unsupported character" in line
    assert not out2.exists()  # a failed batch leaves no empty output directory


def test_failed_batch_leaves_no_output_directory(capsys, full_model, tmp_path):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"text,speaker,out\nOne.,{tmp_path / 'missing.wav'},\n")
    out = tmp_path / "batch"
    rc = main(["--model", str(full_model), "--text-file", str(jobs), "--out", str(out), *FAST])
    assert "missing.wav" in _one_line_error(capsys.readouterr().err, rc)
    assert not out.exists()


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import mvjax.core.atomic
    from mvjax.audio.io import AudioError, write_wav

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "o.wav"
    target.write_bytes(b"previous")
    monkeypatch.setattr(mvjax.core.atomic, "open", full, raising=False)
    with pytest.raises(AudioError, match="No space left on device"):
        write_wav(target, np.zeros(100, np.float32), 24000)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["o.wav"]


def test_corrupt_wav_is_called_corrupt(tmp_path):
    from mvjax.audio.io import AudioError, load_audio

    bad = tmp_path / "voice.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00garbage-garbage")
    with pytest.raises(AudioError) as info:
        load_audio(bad)
    if shutil.which("ffmpeg") is None:
        assert "not a valid WAV file" in str(info.value) and "ffmpeg" not in str(info.value)
    else:  # ffmpeg gets its chance and reports the file as unreadable
        assert "not a readable audio file" in str(info.value)


def test_damaged_parameters_are_one_line(full_model, speaker_wav, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(full_model, model)
    manifest = model / "first_stage" / "params" / "manifest.ocdbt"
    data = bytearray(manifest.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0x5A
    manifest.write_bytes(bytes(data))
    res = subprocess.run([sys.executable, "-m", "mvjax.synthesize", "--model", str(model), "--text", "Hi.",
                          "--speaker", speaker_wav, "--out", str(tmp_path / "o.wav"), *FAST],
                         capture_output=True, text=True, cwd=REPO)
    line = _one_line_error(res.stderr, res.returncode)
    assert res.stderr.strip() == line and "first_stage" in line and "damaged" in line
    assert not (tmp_path / "o.wav").exists()


def test_vocode_refuses_a_plain_npy(tmp_path):
    codes = tmp_path / "codes.npy"
    np.save(codes, np.zeros((8, 10), np.int64))
    res = subprocess.run([sys.executable, "-m", "mvjax.vocode", "--model", str(tmp_path), "--tokens", str(codes),
                          "--out", str(tmp_path / "o.wav")], capture_output=True, text=True, cwd=REPO)
    assert ".npz" in _one_line_error(res.stderr, res.returncode)


def test_released_directory_cache_is_keyed_by_content(released_model, tmp_path):
    """Moving or touching the released files reuses their conversion; editing one converts anew."""
    from mvjax.sources.resolve import resolve_model

    first = resolve_model(released_model, cache_root=tmp_path / "cache", log_fn=lambda m: None)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in released_model.iterdir():
        shutil.copy(f, moved / f.name)  # new path, new mtimes, same bytes
    logs = []
    assert resolve_model(moved, cache_root=tmp_path / "cache", log_fn=logs.append) == first and not logs


def test_diffusion_memory_estimate_grows_with_attention_and_splits_batches():
    from mvjax.inference.throughput import rows_that_fit, unet_bytes_per_row
    from mvjax.nn.diffusion_unet import UnetConfig

    plain = UnetConfig(hidden=16, depth=2, stride=4, kernel=8, codec_dim=128)
    attn = UnetConfig(hidden=16, depth=2, stride=4, kernel=8, codec_dim=128, transformer=True)
    short, long = 64 * 320, 256 * 320
    # Without attention the working set is linear in length; the transformer's is quadratic.
    assert unet_bytes_per_row(plain, long, 256) < 4.5 * unet_bytes_per_row(plain, short, 64)
    assert unet_bytes_per_row(attn, long, 256) > 10 * unet_bytes_per_row(attn, short, 64)
    per_row = unet_bytes_per_row(attn, long, 256)
    assert per_row > 8 * 5120 ** 2 * 4  # 8 heads of 5,120 x 5,120 float32 scores at 256 frames
    assert rows_that_fit(per_row, available=int(3.5 * per_row / 0.7)) == 3
    assert rows_that_fit(per_row, available=1) == 1
