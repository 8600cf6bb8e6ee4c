"""Training reads its split in place: rows memory-mapped from the .npz, fetched and checked as steps take them.

The loop's lazy path must train exactly as the whole-array path did (same rows, same order, bit for bit), and
damaged data must still stop ``python -m mvjax.finetune train`` with one line: refused at open when a header is
wrong, at the step that reads the row when a value is. Which rows each process of a multi-process job reads is
checked in tests/test_multihost_train.py.
"""

import json

import numpy as np
import pytest

from mvjax.cli.finetune import main
from mvjax.train.data import DataError, load_split, write_manifest, write_split
from mvjax.train.split_reader import open_split

ROWS = 8


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from mvjax.sources.demo import demo_model_dir

    return demo_model_dir(tmp_path_factory.mktemp("demo_cache"))


def _arrays(demo_model) -> dict:
    """8 rows for the demo model: a short text, then random codes of a different length per row."""
    from mvjax.io.checkpoint import load_gpt_stage

    _, _, tok = load_gpt_stage(demo_model, "first_stage")
    pad, ctx = tok.offset - 1, 64
    rng = np.random.default_rng(0)
    tokens = np.full((ROWS, 1, ctx + 1), pad, np.int32)
    for r in range(ROWS):
        row = np.concatenate([tok.encode("hello there"), rng.integers(0, pad, 20 + 3 * r)])
        tokens[r, 0, : len(row)] = row
    return {"tokens": tokens, "spk": rng.standard_normal((ROWS, 256)).astype(np.float32),
            "texts": np.asarray(["hello there"] * ROWS), "audio": np.asarray(["a.wav"] * ROWS),
            "frames": np.full(ROWS, 10, np.int32), "pad": pad, "ctx": ctx}


def _write(out, a: dict, savez=None):
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: a[k] for k in ("tokens", "spk", "texts", "audio", "frames")}
    if savez is None:
        write_split(out / "train.npz", *arrays.values())
    else:
        savez(out / "train.npz", **arrays)
    write_manifest(out, {"format": "mvjax-finetune-data", "version": 1, "model": "demo", "ctx_window": a["ctx"],
                         "pad_token": a["pad"], "codebook_size": a["pad"] // 2, "speaker_emb_dim": 256,
                         "splits": {"train": {"rows": ROWS, "skipped": {}}}})
    return out


@pytest.fixture(scope="module")
def arrays(demo_model):
    return _arrays(demo_model)


@pytest.fixture(scope="module")
def data(arrays, tmp_path_factory):
    return _write(tmp_path_factory.mktemp("data"), arrays)


def test_open_split_maps_the_arrays_and_reads_only_the_rows_asked_for(arrays, data, tmp_path):
    split = open_split(data)
    assert len(split) == ROWS and split.ctx_window == 64
    assert isinstance(split.tokens, np.memmap) and isinstance(split.spk, np.memmap)  # mapped, not loaded
    ids = np.array([5, 0, 5, 7])
    np.testing.assert_array_equal(split.tokens_rows(ids), arrays["tokens"][ids])
    np.testing.assert_array_equal(split.spk_rows(ids), arrays["spk"][ids])
    whole = load_split(data)
    np.testing.assert_array_equal(np.asarray(split.tokens), whole.tokens)
    # A bad value is found in the rows that hold it, and only there: the others read as before.
    bad = dict(arrays, tokens=arrays["tokens"].copy(), spk=arrays["spk"].copy())
    bad["tokens"][3, 0, 40] = -5
    bad["spk"][6, 17] = np.inf
    split = open_split(_write(tmp_path / "bad", bad))
    np.testing.assert_array_equal(split.tokens_rows([0, 1, 2, 4]), arrays["tokens"][[0, 1, 2, 4]])
    with pytest.raises(DataError, match=r"row 3: negative token ids"):
        split.tokens_rows([1, 3])
    with pytest.raises(DataError, match=r"row 6: non-finite speaker embedding"):
        split.spk_rows([7, 6, 3])
    with pytest.raises(DataError, match="outside"):
        split.spk_rows([ROWS])


def test_the_loop_trains_on_mapped_rows_exactly_as_on_whole_arrays(demo_model, data, tmp_path):
    """The run's losses (lazy rows, the loop) equal, bit for bit, those of the same run stepped by hand on the
    whole loaded arrays indexed by the same rows: the values reaching the step are the same, so is the program."""
    from mvjax.train.loop import load_run_model
    from mvjax.train.run import batch_rows, read_run_file, run_configs
    from mvjax.train.trainer import Trainer

    run = tmp_path / "run"
    assert main(["train", "--model", str(demo_model), "--data", str(data), "--out", str(run), "--steps", "5",
                 "--batch-size", "2", "--grad-accum", "2", "--learning-rate", "1e-3", "--last-n-blocks", "1",
                 "--no-progress"]) == 0
    got = [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if m["kind"] == "train"]
    settings = read_run_file(run)
    spec, optim, loop = run_configs(settings)
    assert spec.dropout > 0  # the dropout masks too must come out the same
    cfg, params, tok = load_run_model(settings)
    trainer = Trainer(cfg, params, spec, optim, tok.offset - 1, lora_seed=loop.seed)
    state, split, want = trainer.init_state(loop.seed), load_split(data), []
    for step in range(loop.steps):
        idx = batch_rows(ROWS, step * loop.rows_per_step, loop.rows_per_step, loop.seed)
        rows = split.tokens[idx].reshape(loop.grad_accum, loop.batch_size, *split.tokens.shape[1:])
        state, m = trainer.step(state, rows, split.spk[idx].reshape(loop.grad_accum, loop.batch_size, -1))
        want.append(float(m["loss"]))
    assert len(got) == 5 and got == want


def _fortran(path, **arrays):
    np.savez(path, **{**arrays, "tokens": np.asfortranarray(arrays["tokens"])})


def _short_rows(path, **arrays):
    np.savez(path, **{**arrays, "tokens": np.ascontiguousarray(arrays["tokens"][:, :, :-1])})


def _changed(name, row, index, value):
    def change(a):
        a = dict(a, **{name: a[name].copy()})
        a[name][(row, *index)] = value
        return a

    return change


@pytest.mark.parametrize("savez, change, needle", [
    (np.savez_compressed, None, "tokens is compressed"),
    (_fortran, None, "tokens is stored in Fortran order"),
    (_short_rows, None, "tokens is int32[8, 1, 64], expected int32[8, 1, 65]"),
    (None, _changed("tokens", 5, (0, 30), -1), "row 5: negative token ids"),
    (None, _changed("spk", 2, (100,), np.nan), "row 2: non-finite speaker embedding"),
    (None, _changed("frames", 7, (), 0), "row 7: no audio frames"),
], ids=["compressed", "fortran", "shape", "negative-token", "nan-speaker", "no-frames"])
def test_damaged_training_data_stops_train_in_one_line(demo_model, arrays, tmp_path, capsys, savez, change, needle):
    data = _write(tmp_path / "data", change(arrays) if change else arrays, savez)
    # 4 steps of 2 rows read every row once (the first epoch's shuffle), so the bad row is always reached.
    rc = main(["train", "--model", str(demo_model), "--data", str(data), "--out", str(tmp_path / "run"),
               "--steps", "4", "--batch-size", "2", "--last-n-blocks", "1", "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert str(data / "train.npz") in err[0]
