"""python -m mvjax.synthesize: end to end on the fixture model, the demo, devices, processes, bad input."""

import hashlib
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from mvjax.cli.synthesize import main
from tests.conftest import REPO


def _cli(*args, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mvjax.synthesize", *args], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=timeout)


def _one_line_error(capsys_or_text, rc):
    text = capsys_or_text if isinstance(capsys_or_text, str) else capsys_or_text.readouterr().err
    lines = [l for l in text.strip().splitlines() if l.startswith("error:")]
    assert rc != 0
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture(scope="module")
def speaker_wav(fixtures):
    return str(fixtures / "speaker" / "reference_speaker.wav")


def test_cli_reproduces_pipeline_cases(full_model, fixtures, speaker_wav, tmp_path):
    p = np.load(fixtures / "pipeline_cases.npz")
    out, tokens = tmp_path / "hello.wav", tmp_path / "hello.npz"
    rc = main(["--model", str(full_model), "--text", str(p["text"]), "--speaker", speaker_wav, "--out", str(out),
               "--temperature", "0", "--stage2-temperature", "0", "--max-new-tokens", str(int(p["max_new_tokens"])), "--save-tokens", str(tokens),
               "--decoder", "encodec", "--quiet"])
    assert rc == 0
    saved = np.load(tokens)
    np.testing.assert_array_equal(saved["first_stage"], p["first_stage_tokens"])
    np.testing.assert_array_equal(saved["all_codebooks"], p["all_codebooks"])
    emb = saved["speaker_embedding"]
    assert emb @ p["spk_emb"] / np.linalg.norm(emb) / np.linalg.norm(p["spk_emb"]) >= 0.9999
    audio, rate = sf.read(out)
    assert rate == 48000 and audio.ndim == 1 and sf.info(out).subtype == "PCM_16"
    assert abs(audio.size / rate - p["all_codebooks"].shape[1] * 320 / 24000) < 0.01
    assert sorted(f.name for f in tmp_path.iterdir()) == ["hello.npz", "hello.wav"]  # no temporary files left


def test_demo_runs_on_a_fresh_cache(tmp_path):
    out = tmp_path / "demo.wav"
    res = _cli("--demo", "--out", str(out), env={"MVJAX_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "not speech" in res.stderr and "enhancement skipped" in res.stderr
    audio, rate = sf.read(out)
    assert rate == 24000 and audio.size > 0 and np.all(np.isfinite(audio))
    # Audibly something: DeepFilterNet3 is skipped in demo mode, so the loudness-normalised noise stays.
    rms_db = 20 * np.log10(np.sqrt(np.mean(audio ** 2)) + 1e-12)
    assert rms_db > -30, rms_db
    # The demo model is written in the released layout and converted by our converter.
    manifest = next((tmp_path / "cache" / "demo").glob("*/manifest.json"))
    assert all(k in manifest.read_text() for k in ("first_stage", "second_stage", "speaker_encoder", "encodec", "mbd"))


def test_six_texts_on_four_devices_match_one_device(full_model, speaker_wav, tmp_path):
    script = textwrap.dedent(f"""
        import jax, numpy as np
        assert jax.local_device_count() == 4, jax.devices()
        from mvjax.core.parallel import local_mesh
        from mvjax.inference.pipeline import TTS
        texts = ["Hello there.", "A second, rather longer text for the batch.", "Third one!", "Four.",
                 "The fifth text is here, with a clause.", "Six and last."]
        runs, audio = {{}}, {{}}
        for name, mesh in (("one", None), ("four", local_mesh())):
            tts = TTS.load({str(full_model)!r}, mesh=mesh, speaker_cache_dir=None)
            voice = tts.speaker_embedding({speaker_wav!r})
            runs[name] = tts.tokens(texts, voice, seed=3, max_new_tokens=40, batch_size=8)
            # Diffusion batched over the devices too (2 texts padded to 4 rows).
            audio[name] = tts.synthesize(texts[:2], voice, seed=3, max_new_tokens=40, decoder="mbd", enhance=False)
        for a, b in zip(runs["one"], runs["four"]):
            assert np.array_equal(a.first_stage_codes, b.first_stage_codes)
            assert np.array_equal(a.all_codebooks, b.all_codebooks)
        for a, b in zip(audio["one"], audio["four"]):
            assert np.array_equal(a.all_codebooks, b.all_codebooks)
            assert a.audio.shape == b.audio.shape and np.abs(a.audio - b.audio).max() < 1e-5
        runs["one"] = runs["one"]
        print("frames", [s.all_codebooks.shape[1] for s in runs["one"]])
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "frames" in res.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_split_a_text_file(full_model, speaker_wav, tmp_path):
    texts = ["First line of the file.", "Second line, a little longer.", "Third.", "Fourth and last line."]
    text_file = tmp_path / "texts.txt"
    text_file.write_text("\n".join(texts) + "\n")
    out_dir, tok_dir = tmp_path / "out", tmp_path / "tokens"
    tok_dir.mkdir()
    port = _free_port()
    common = ["--model", str(full_model), "--text-file", str(text_file), "--speaker", speaker_wav, "--out", str(out_dir),
              "--save-tokens", str(tok_dir), "--decoder", "encodec", "--no-enhance", "--max-new-tokens", "30",
              "--seed", "7", "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen([sys.executable, "-m", "mvjax.synthesize", *common, "--process-id", str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    written = [line.split()[1] for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("wrote ")]
    assert sorted(written) == sorted(str(out_dir / f"{i:04d}.wav") for i in range(4))  # each exactly once
    assert "process 0 of 2: 2 of 4 texts" in outputs[0][1] and "process 1 of 2: 2 of 4 texts" in outputs[1][1]
    # Same tokens as one process synthesising the whole file.
    from mvjax.inference.pipeline import TTS

    tts = TTS.load(full_model, mesh=None, speaker_cache_dir=None)
    alone = tts.tokens(texts, tts.speaker_embedding(speaker_wav), seed=7, max_new_tokens=30)
    for i, speech in enumerate(alone):
        saved = np.load(tok_dir / f"{i:04d}.npz")
        np.testing.assert_array_equal(saved["all_codebooks"], speech.all_codebooks)


def test_csv_text_file_with_speakers_and_outputs(full_model, speaker_wav, tmp_path):
    emb = tmp_path / "voice.npy"
    from mvjax.inference.pipeline import TTS

    np.save(emb, TTS.load(full_model, mesh=None, speaker_cache_dir=None).speaker_embedding(speaker_wav))
    csv_file = tmp_path / "jobs.csv"
    csv_file.write_text(f'text,speaker,out\n"Hello, first row.",{speaker_wav},{tmp_path / "a.wav"}\n'
                        f"Second row.,{emb},\n")
    rc = main(["--model", str(full_model), "--text-file", str(csv_file), "--out", str(tmp_path / "batch"),
               "--decoder", "encodec", "--no-enhance", "--max-new-tokens", "20", "--quiet"])
    assert rc == 0
    assert sf.info(tmp_path / "a.wav").samplerate == 24000
    assert sf.info(tmp_path / "batch" / "0001.wav").samplerate == 24000


# --- bad input: one line, non-zero exit, no output file -----------------------------------


@pytest.fixture()
def outdir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def _assert_nothing_written(outdir):
    assert list(outdir.iterdir()) == []


def test_missing_model_directory(capsys, outdir, speaker_wav, tmp_path):
    rc = main(["--model", str(tmp_path / "nope"), "--text", "Hi.", "--speaker", speaker_wav, "--out", str(outdir / "o.wav")])
    assert "not found" in _one_line_error(capsys, rc)
    _assert_nothing_written(outdir)


def test_directory_without_checkpoints(capsys, outdir, speaker_wav, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    rc = main(["--model", str(empty), "--text", "Hi.", "--speaker", speaker_wav, "--out", str(outdir / "o.wav")])
    assert "first_stage.pt" in _one_line_error(capsys, rc)
    _assert_nothing_written(outdir)


def test_corrupt_checkpoint_file(capsys, outdir, speaker_wav, tmp_path):
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "first_stage.pt").write_bytes(b"this is not a checkpoint")
    rc = main(["--model", str(bad), "--text", "Hi.", "--speaker", speaker_wav, "--out", str(outdir / "o.wav")],)
    assert "first_stage.pt" in _one_line_error(capsys, rc)
    _assert_nothing_written(outdir)


def test_converted_model_missing_a_stage(capsys, outdir, speaker_wav, converted, tmp_path):
    import json
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(converted, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    del manifest["components"]["second_stage"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    rc = main(["--model", str(partial), "--text", "Hi.", "--speaker", speaker_wav, "--out", str(outdir / "o.wav")])
    assert "second_stage" in _one_line_error(capsys, rc)
    _assert_nothing_written(outdir)


@pytest.mark.parametrize("text, message", [("Hello \u4e16\u754c", "unsupported character"), ("  \n ", "empty")])
def test_bad_text(capsys, outdir, speaker_wav, full_model, text, message):
    rc = main(["--model", str(full_model), "--text", text, "--speaker", speaker_wav, "--out", str(outdir / "o.wav")])
    assert message in _one_line_error(capsys, rc)
    _assert_nothing_written(outdir)


def test_missing_and_bad_speaker_audio(capsys, outdir, full_model, tmp_path):
    rc = main(["--model", str(full_model), "--text", "Hi.", "--speaker", str(tmp_path / "none.wav"), "--out",
               str(outdir / "o.wav")])
    assert "speaker audio not found" in _one_line_error(capsys, rc)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    rc = main(["--model", str(full_model), "--text", "Hi.", "--speaker", str(broken), "--out", str(outdir / "o.wav")])
    assert "broken.wav" in _one_line_error(capsys, rc)
    rc = main(["--model", str(full_model), "--text", "Hi.", "--out", str(outdir / "o.wav")])
    assert "--speaker" in _one_line_error(capsys, rc)
    _assert_nothing_written(outdir)


def test_output_problems(capsys, outdir, full_model, speaker_wav, tmp_path):
    rc = main(["--model", str(full_model), "--text", "Hi.", "--speaker", speaker_wav, "--out",
               str(tmp_path / "no_such_dir" / "o.wav")])
    assert "does not exist" in _one_line_error(capsys, rc)
    rc = main(["--model", str(full_model), "--text", "Hi.", "--speaker", speaker_wav, "--out", str(outdir / "o.mp4")])
    assert ".wav" in _one_line_error(capsys, rc)
    _assert_nothing_written(outdir)


def test_never_overwrites_the_speaker_file(capsys, full_model, speaker_wav, tmp_path):
    copy = tmp_path / "voice.wav"
    copy.write_bytes(open(speaker_wav, "rb").read())
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    rc = main(["--model", str(full_model), "--text", "Hi.", "--speaker", str(copy), "--out", str(copy)])
    assert "speaker" in _one_line_error(capsys, rc)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest


def test_unwritable_output_leaves_no_file(full_model, speaker_wav, tmp_path):
    """A directory the process cannot write: refused up front, or (as root, where permission bits do
    not apply) the write itself fails at the end; either way one line, exit 1, nothing written."""
    if os.geteuid() == 0:
        target = "/proc/self/mvjax-out.wav"  # even root cannot create files here
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = str(locked / "o.wav")
    res = _cli("--model", str(full_model), "--text", "Hi.", "--speaker", speaker_wav, "--out", target,
               "--decoder", "encodec", "--no-enhance", "--max-new-tokens", "8", "--quiet")
    _one_line_error(res.stderr, res.returncode)
    assert not os.path.exists(target)


def test_hub_id_offline_is_a_clear_error(capsys, outdir, speaker_wav, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MVJAX_CACHE", str(tmp_path / "cache"))
    rc = main(["--model", "metavoiceio/metavoice-1B-v0.1", "--text", "Hi.", "--speaker", speaker_wav,
               "--out", str(outdir / "o.wav")])
    line = _one_line_error(capsys, rc)
    assert "huggingface_hub" in line or "cannot download" in line
    _assert_nothing_written(outdir)


def test_unconverted_directory_is_converted_once_into_the_cache(released_model, speaker_wav, tmp_path, capsys):
    from mvjax.sources.resolve import resolve_model

    logs = []
    first = resolve_model(released_model, cache_root=tmp_path, log_fn=logs.append)
    assert (first / "manifest.json").is_file() and any("converting" in l for l in logs)
    logs.clear()
    assert resolve_model(released_model, cache_root=tmp_path, log_fn=logs.append) == first
    assert not logs  # reused, not converted again
