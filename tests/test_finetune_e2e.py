"""End to end on the demo model, through the real command: prepare clips made here, train, kill -9 and
resume (the same losses as a run never stopped), export, synthesize from the export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO

STEPS = 240


def _cmd(*args, timeout=600, check=True):
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _clip(path: Path, seconds: float, rate: int, channels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    audio = tone[:, None] + 0.02 * rng.standard_normal((t.size, channels))
    sf.write(path, audio.astype(np.float32), rate)


def _tensorboard_scalars(run: Path) -> dict:
    """{tag: {step: value}} from the run's TensorBoard event files (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict = {}
    files = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def _losses(run: Path) -> dict:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-data")
    clips = root / "clips"
    clips.mkdir()
    for i, (sec, rate, ch) in enumerate([(1.2, 16000, 1), (0.8, 44100, 2), (1.0, 22050, 1), (0.6, 24000, 1)]):
        _clip(clips / f"c{i}.wav", sec, rate, ch, i)
    sf.write(clips / "silent.wav", np.zeros(16000, np.float32), 16000)
    (clips / "c2.txt").write_text("A caption read from its own file.")
    (root / "train.csv").write_text(
        "audio_files|captions\n"
        "clips/c0.wav|Hello from the first clip.\n"
        "clips/c1.wav|A stereo clip at forty four kilohertz.\n"
        "clips/c2.wav|clips/c2.txt\n"
        "clips/missing.wav|This file does not exist.\n"
        "clips/c0.wav|\n"
        "clips/silent.wav|Only silence here.\n")
    (root / "val.jsonl").write_text(json.dumps({"audio": "clips/c3.wav", "text": "Held out for validation."}) + "\n")
    res = _cmd("mvjax.finetune", "prepare", "--demo", "--train", str(root / "train.csv"), "--val",
               str(root / "val.jsonl"), "--out", str(root / "DATA"), "--ctx-window", "256")
    log = res.stdout + res.stderr
    for reason in ("missing", "empty", "silent"):
        assert reason in log.lower(), log
    return root


def test_prepare_keeps_the_good_rows_and_names_the_bad(dataset):
    manifest = json.loads((dataset / "DATA" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 3
    assert sum(manifest["splits"]["train"]["skipped"].values()) == 3
    assert manifest["splits"]["val"]["rows"] == 1
    with np.load(dataset / "DATA" / "train.npz") as data:
        assert "A caption read from its own file." in data["texts"].tolist()


def test_train_kill_resume_export_synthesize(dataset, tmp_path):
    common = ["--demo", "--data", str(dataset / "DATA"), "--steps", str(STEPS), "--eval-every", "20",
              "--learning-rate", "1e-3", "--no-progress"]
    whole = tmp_path / "whole"
    _cmd("mvjax.finetune", "train", *common, "--out", str(whole))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mvjax.finetune", "train", *common, "--out", str(killed)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "40").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps_before = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps_before and max(steps_before) < STEPS, "the kill must land mid-run"
    res = _cmd("mvjax.finetune", "train", "--resume", "--out", str(killed), "--no-progress")
    assert f"resuming at step {max(steps_before)}" in res.stdout + res.stderr
    a, b = _losses(whole), _losses(killed)
    board = _tensorboard_scalars(whole)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
            "eval/val_loss"} <= set(board)
    assert sorted(board["train/loss"]) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([board["train/loss"][s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=1e-6)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bit for bit: same program, same inputs
    evals = [json.loads(line)["val_loss"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert evals[-1] < evals[0]

    model2 = tmp_path / "model2"
    _cmd("mvjax.finetune", "export", "--run", str(killed), "--step", "best", "--out", str(model2), "--torch")
    assert (model2 / "first_stage.pt").is_file()
    wav = tmp_path / "out.wav"
    _cmd("mvjax.synthesize", "--model", str(model2), "--text", "Speaking from the fine-tuned model.",
         "--speaker", str(dataset / "clips" / "c0.wav"), "--decoder", "encodec", "--no-enhance",
         "--max-new-tokens", "40", "--out", str(wav))
    audio, rate = sf.read(wav)
    assert rate == 24000 and audio.size > 0 and np.isfinite(audio).all()


def test_resume_refuses_changed_settings_and_new_runs_refuse_old_dirs(dataset, tmp_path):
    run = tmp_path / "run"
    _cmd("mvjax.finetune", "train", "--demo", "--data", str(dataset / "DATA"), "--steps", "2", "--no-progress",
         "--out", str(run))
    res = _cmd("mvjax.finetune", "train", "--demo", "--data", str(dataset / "DATA"), "--out", str(run), check=False)
    assert res.returncode == 1 and "--resume" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _cmd("mvjax.finetune", "train", "--resume", "--out", str(run), "--learning-rate", "1e-2", check=False)
    assert res.returncode == 1 and "learning_rate" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _cmd("mvjax.finetune", "train", "--resume", "--out", str(run), "--steps", "4", "--no-progress")
    assert sorted(_losses(run)) == [1, 2, 3, 4]
