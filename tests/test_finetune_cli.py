"""The train and export commands' bad input: one line on stderr, exit 1, nothing half-written."""

import json

import numpy as np
import pytest

from mvjax.cli.finetune import main
from mvjax.train.data import write_manifest, write_split


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from mvjax.sources.demo import demo_model_dir

    return demo_model_dir(tmp_path_factory.mktemp("demo_cache"))


@pytest.fixture(scope="module")
def data(demo_model, tmp_path_factory):
    """A small prepared-data directory for the demo model (rows of random codes after a short text)."""
    from mvjax.io.checkpoint import load_gpt_stage

    _, _, tok = load_gpt_stage(demo_model, "first_stage")
    pad, ctx = tok.offset - 1, 64
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("data")
    rows = np.full((4, 1, ctx + 1), pad, np.int32)
    for r in range(4):
        text = tok.encode("hello there")
        audio = rng.integers(0, pad, 20)
        rows[r, 0, : len(text) + 20] = np.concatenate([text, audio])
    write_split(out / "train.npz", rows, rng.standard_normal((4, 256)).astype(np.float32), ["hello there"] * 4,
                ["a.wav"] * 4, [10] * 4)
    write_manifest(out, {"format": "mvjax-finetune-data", "version": 1, "model": str(demo_model),
                         "ctx_window": ctx, "pad_token": pad, "codebook_size": pad // 2, "speaker_emb_dim": 256,
                         "splits": {"train": {"rows": 4, "skipped": {}}}})
    return out


def _one_line(capsys, rc, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    return err[0]


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--warmup-steps", "-2"], "--warmup-steps"),
    (["--learning-rate", "nan"], "finite"),
    (["--learning-rate", "-1"], "learning_rate"),
    (["--lora-rank", "4", "--lora-blocks", "a-b"], "--lora-blocks"),
    (["--lora-rank", "4", "--lora-targets", "ffn"], "unknown LoRA target"),
    (["--last-n-blocks", "9"], "last_n_blocks"),
    (["--loss-mask", "text"], "loss_mask"),
    (["--schedule", "linear"], "schedule"),
])
def test_bad_training_settings_are_one_line(demo_model, data, tmp_path, capsys, extra, needle):
    rc = main(["train", "--model", str(demo_model), "--data", str(data), "--out", str(tmp_path / "run"), *extra])
    _one_line(capsys, rc, needle)
    assert not (tmp_path / "run").exists()


def test_config_files_are_checked(demo_model, data, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"learning_rate": 1e-3, "warp_factor": 9}))
    _one_line(capsys, main(["train", "--model", str(demo_model), "--data", str(data), "--out", str(tmp_path / "r"),
                            "--config", str(cfg)]), "warp_factor")
    cfg.write_text("{not json")
    _one_line(capsys, main(["train", "--model", str(demo_model), "--data", str(data), "--out", str(tmp_path / "r"),
                            "--config", str(cfg)]), "cannot be parsed")
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 2\nbatch-size = 2\nlearning-rate = 1e-3\neval-every = 1\n')
    assert main(["train", "--model", str(demo_model), "--data", str(data), "--out", str(tmp_path / "ok"),
                 "--config", str(toml), "--no-progress"]) == 0
    settings = json.loads((tmp_path / "ok" / "run.json").read_text())
    assert settings["loop"]["steps"] == 2 and settings["optim"]["learning_rate"] == 1e-3


def test_missing_inputs_are_one_line(demo_model, data, tmp_path, capsys):
    _one_line(capsys, main(["train", "--model", str(demo_model), "--data", str(tmp_path / "nope"),
                            "--out", str(tmp_path / "r")]), "not found")
    _one_line(capsys, main(["train", "--resume", "--out", str(tmp_path / "empty")]), "run.json")
    _one_line(capsys, main(["train", "--data", str(data), "--out", str(tmp_path / "r")]), "--model")
    _one_line(capsys, main(["export", "--run", str(tmp_path / "norun"), "--out", str(tmp_path / "m")]), "run")
    assert not (tmp_path / "m").exists()


def test_export_of_a_run_without_validation_refuses_best(demo_model, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", str(demo_model), "--data", str(data), "--out", str(run), "--steps", "2",
                 "--no-progress"]) == 0
    _one_line(capsys, main(["export", "--run", str(run), "--step", "best", "--out", str(tmp_path / "m")]),
              "validation")
    _one_line(capsys, main(["export", "--run", str(run), "--step", "7", "--out", str(tmp_path / "m")]), "step 7")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["finetuned"]["step"] == 2


def test_checkpoints_keep_the_last_and_the_best_and_best_means_lowest_validation_loss(tmp_path):
    import jax.numpy as jnp

    from mvjax.train.run import checkpoint_manager, pick_step, save_checkpoint

    manager = checkpoint_manager(tmp_path, keep=1)
    for step, val in ((1, 3.0), (2, 1.0), (3, 2.0), (4, None)):
        save_checkpoint(manager, {"w": jnp.full((2,), float(step))},
                        {"step": step, "rows_seen": step, "loss": 0.0, "val_loss": val}, val)
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 4]  # the latest, and the lowest validation loss
    assert pick_step(manager, "best") == 2 and pick_step(manager, None) == 4 and pick_step(manager, 2) == 2
    manager.close()
