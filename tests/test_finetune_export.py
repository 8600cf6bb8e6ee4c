"""Exporting a fine-tuned first stage: the released-layout writer is the exact inverse of the
converter (checked with torch itself and the reference model), ``export_model`` writes a complete
model directory that loads and speaks, and every refusal or interruption leaves nothing behind."""

import argparse
import hashlib
import json
import os
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from convert_weights import write_released_gpt
from convert_weights.gpt import convert_gpt_checkpoint
from convert_weights.mapping import strip_prefix
from convert_weights.safe_pickle import load_checkpoint
from mvjax.core.errors import MvjaxError
from mvjax.io.checkpoint import MANIFEST, load_gpt_stage, tree_digest
from mvjax.train import export as export_mod
from mvjax.train.export import ExportError, export_model

torch = pytest.importorskip("torch")

REFERENCE_SRC = Path(os.environ.get("MVJAX_REFERENCE_SRC", "/tmp/mvsrc"))


def _reference_gpt():
    """The reference ``GPT`` and ``GPTConfig`` classes, or a skip saying why they are unavailable."""
    if not (REFERENCE_SRC / "fam" / "llm" / "model.py").is_file():
        pytest.skip(f"reference source not found at {REFERENCE_SRC} (set MVJAX_REFERENCE_SRC to a metavoice-src checkout)")
    sys.path.insert(0, str(REFERENCE_SRC))
    try:
        from fam.llm.model import GPT, GPTConfig
    except ImportError as exc:  # einops, tqdm ... missing
        pytest.skip(f"the reference model cannot be imported from {REFERENCE_SRC}: {exc}")
    finally:
        sys.path.remove(str(REFERENCE_SRC))
    return GPT, GPTConfig


def _speaker_dim(ckpt: dict):
    meta = ckpt["meta"]
    return meta["speaker_emb_size"] if meta.get("speaker_cond") else None


def _twin(ckpt: dict):
    """The torch twin built from the file's own model_args, loaded strictly (the reference's recipe)."""
    from tests.torch_twin import TwinGPT

    twin = TwinGPT(ckpt["model_args"], _speaker_dim(ckpt)).eval()
    twin.load_state_dict(ckpt["model"], strict=True)
    return twin


def _reference(ckpt: dict):
    """The reference model built as its inference builds it: ``GPTConfig(**model_args)``, strict load."""
    import dataclasses

    GPT, GPTConfig = _reference_gpt()
    assert set(ckpt["model_args"]) == {f.name for f in dataclasses.fields(GPTConfig)}
    model = GPT(GPTConfig(**ckpt["model_args"]), speaker_emb_dim=_speaker_dim(ckpt)).eval()
    model.load_state_dict(ckpt["model"], strict=True)
    assert list(model.state_dict()) == list(ckpt["model"])  # the reference module's registration order
    return model


def _round_trip(src: Path, tmp_path: Path, same_order: bool = True) -> dict:
    """Convert ``src`` with our converter, write it back; compare both loads of the result with ``src``."""
    original = load_checkpoint(src)
    config, params, spec = convert_gpt_checkpoint(original)
    out = write_released_gpt(tmp_path / "written.pt", config, params, spec, dict(original.get("config") or {}))
    want = strip_prefix(original["model"])
    ours = load_checkpoint(out)
    theirs = torch.load(out, weights_only=True)
    for loaded in (ours, theirs):
        state = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in loaded["model"].items()}
        assert (list(state) == list(want)) if same_order else (sorted(state) == sorted(want))
        for key, value in want.items():
            assert state[key].dtype == value.dtype and np.array_equal(state[key], value), key
        assert loaded["model_args"] == original["model_args"]
        assert loaded["meta"] == original["meta"]
        assert loaded["config"]["causal"] == original["model_args"]["causal"]
    if config.tied_heads:
        for i in range(len(config.vocab_sizes)):  # one shared storage, as torch.save writes a tied module
            assert theirs["model"][f"lm_heads.{i}.weight"].data_ptr() == theirs["model"][f"transformer.wtes.{i}.weight"].data_ptr()
    # And it converts back into exactly the same tree.
    config2, params2, spec2 = convert_gpt_checkpoint(ours)
    assert config2 == config and spec2 == spec and tree_digest(params2) == tree_digest(params)
    return theirs


@pytest.mark.parametrize("stage, name", [("stage1", "first_stage.pt"), ("stage2", "second_stage.pt")])
def test_released_layout_round_trip(fixtures, tmp_path, stage, name):
    _twin(_round_trip(fixtures / stage / name, tmp_path))


def test_round_trip_with_biases_and_layernorm(tmp_path):
    """Linear and norm biases (the released stages have none) go back under their torch names."""
    from tests.torch_twin import model_args, save_checkpoint

    args = model_args(bias=True, norm_type="layernorm", rmsnorm_eps=None, nonlinearity_type="gelu",
                      swiglu_multiple_of=None)
    save_checkpoint(tmp_path / "biased.pt", args, seed=3)
    ckpt = _round_trip(tmp_path / "biased.pt", tmp_path, same_order=False)  # the twin registers ln_2 later
    assert "transformer.h.1.attn.c_attn.bias" in ckpt["model"] and "transformer.ln_f.bias" in ckpt["model"]
    _twin(ckpt)


def test_writer_refuses_quantised_params(converted, tmp_path):
    from mvjax.io.quantize import prepare_quantized_params

    config, params, tokenizer = load_gpt_stage(converted, "first_stage")
    quantised = prepare_quantized_params(config, params, "int8")
    with pytest.raises(MvjaxError) as info:
        write_released_gpt(tmp_path / "q.pt", config, quantised, tokenizer.spec)
    assert "quantised" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --- export_model -------------------------------------------------------------------------------

def _perturbed(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: (np.asarray(p) + 0.02 * rng.standard_normal(p.shape)).astype(np.float32), params)


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(full_model, tmp_path_factory):
    """The full fixture model with a perturbed first stage, exported with the torch file."""
    config, params, tokenizer = load_gpt_stage(full_model, "first_stage")
    tuned = _perturbed(params)
    out = tmp_path_factory.mktemp("export") / "tuned"
    lines = []
    result = export_model(full_model, config, tuned, tokenizer.spec, out, torch=True, log=lines.append,
                          provenance={"run": "/runs/r1", "step": 40})
    assert result == out and lines
    return out, config, tuned


def test_export_writes_a_complete_model(full_model, exported):
    out, config, tuned = exported
    config2, params2, _ = load_gpt_stage(out, "first_stage", verify=True)
    assert config2 == config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params2, tuned)
    base, new = json.loads((full_model / MANIFEST).read_text()), json.loads((out / MANIFEST).read_text())
    assert set(new["components"]) == set(base["components"])
    for name in base["components"]:
        if name != "first_stage":
            assert new["components"][name] == base["components"][name]
            assert _files(out / name) == _files(full_model / name)
    assert new["components"]["first_stage"]["params_sha256"] == tree_digest(tuned)
    assert new["components"]["first_stage"]["params_sha256"] != base["components"]["first_stage"]["params_sha256"]
    for fname in ("config.json", "tokenizer.json"):
        assert (out / "first_stage" / fname).read_bytes() == (full_model / "first_stage" / fname).read_bytes()
    record = new["finetuned"]
    assert record["run"] == "/runs/r1" and record["step"] == 40
    assert record["base_first_stage_sha256"] == base["components"]["first_stage"]["params_sha256"]
    assert record["base_manifest_sha256"] == hashlib.sha256((full_model / MANIFEST).read_bytes()).hexdigest()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_exported_torch_file_is_the_tuned_model(exported):
    """``first_stage.pt`` beside the converted model: torch loads it, the twin of the reference takes it
    strictly, and it computes what our forward computes with the tuned parameters."""
    out, config, tuned = exported
    ckpt = torch.load(out / "first_stage.pt", weights_only=True)
    assert ckpt["config"]["mvjax_step"] == 40 and ckpt["config"]["causal"] is True
    twin = _twin(ckpt)
    tokens, emb = _inputs(config)
    with torch.no_grad():
        want = twin(torch.from_numpy(tokens), torch.from_numpy(emb))[0].numpy()
    np.testing.assert_allclose(_ours_logits(config, tuned, tokens, emb), want, atol=2e-4, rtol=2e-4)


def _inputs(config):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_sizes[0], size=(2, len(config.vocab_sizes), 12))
    return tokens, rng.standard_normal((2, config.speaker_emb_dim)).astype(np.float32)


def _ours_logits(config, params, tokens, emb):
    from mvjax.nn.gpt import forward

    return np.asarray(forward(config, params, tokens, emb)[0])


def test_reference_loads_what_we_write(fixtures, exported, tmp_path):
    """The reference's own GPT (its source at $MVJAX_REFERENCE_SRC, default /tmp/mvsrc) loads every file
    we write strictly, with its own GPTConfig(**model_args), and the exported first stage computes there
    what it computes here."""
    _reference_gpt()  # skips, saying why, when the reference source is not available
    for i, (stage, name) in enumerate((("stage1", "first_stage.pt"), ("stage2", "second_stage.pt"))):
        (tmp_path / str(i)).mkdir()
        _reference(_round_trip(fixtures / stage / name, tmp_path / str(i)))
    out, config, tuned = exported
    model = _reference(torch.load(out / "first_stage.pt", weights_only=True))
    tokens, emb = _inputs(config)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens), speaker_embs=torch.from_numpy(emb))
    # The reference's inference path gives the last position's logits only.
    np.testing.assert_allclose(_ours_logits(config, tuned, tokens, emb)[:, -1:], logits[0].numpy(), atol=2e-4, rtol=2e-4)


def test_exported_model_speaks(exported, tmp_path):
    import soundfile as sf

    from mvjax.cli.synthesize import main

    out, config, _ = exported
    emb = np.random.default_rng(2).standard_normal(config.speaker_emb_dim).astype(np.float32)
    np.save(tmp_path / "voice.npy", emb / np.linalg.norm(emb))
    wav = tmp_path / "speech.wav"
    rc = main(["--model", str(out), "--text", "Hi.", "--speaker-embedding", str(tmp_path / "voice.npy"),
               "--out", str(wav), "--decoder", "encodec", "--no-enhance", "--max-new-tokens", "8", "--quiet"])
    assert rc == 0
    audio, rate = sf.read(str(wav))
    assert rate == 24000 and len(audio) > 0 and np.isfinite(audio).all()


# --- refusals and interruptions -----------------------------------------------------------------

@pytest.fixture(scope="module")
def stage(converted):
    config, params, tokenizer = load_gpt_stage(converted, "first_stage")
    return config, _perturbed(params, seed=5), tokenizer.spec


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize("where, message", [
    (lambda base, tmp: base, "is the base model itself"),
    (lambda base, tmp: base / "sub" / "out", "inside the base model"),
    (lambda base, tmp: base.parent, "contains the base model"),
])
def test_out_may_not_overlap_the_base(converted, stage, tmp_path, where, message):
    before = _files(converted)
    with pytest.raises(ExportError) as info:
        export_model(converted, *stage, where(converted, tmp_path), overwrite=True, log=lambda s: None)
    assert message in _one_line(info)
    assert _files(converted) == before and not (converted / "sub").exists()


def test_existing_out_is_refused_unless_overwrite(converted, stage, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError) as info:
        export_model(converted, *stage, out, log=lambda s: None)
    assert "--overwrite" in _one_line(info)
    with pytest.raises(ExportError) as info:  # not a model directory: never replaced
        export_model(converted, *stage, out, overwrite=True, log=lambda s: None)
    assert "not a model directory" in _one_line(info)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError) as info:
        export_model(converted, *stage, tmp_path / "file", log=lambda s: None)
    assert "not a directory" in _one_line(info)
    # An empty directory is filled; a model directory is replaced with overwrite.
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(converted, *stage, empty, log=lambda s: None)
    assert (empty / MANIFEST).is_file()
    config, params, spec = stage
    again = _perturbed(params, seed=9)
    export_model(converted, config, again, spec, empty, overwrite=True, log=lambda s: None)
    manifest = json.loads((empty / MANIFEST).read_text())
    assert manifest["components"]["first_stage"]["params_sha256"] == tree_digest(again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "out"]


def test_quantised_or_mismatched_params_are_refused(converted, stage, tmp_path):
    import dataclasses

    from mvjax.io.quantize import prepare_quantized_params

    config, params, spec = stage
    for mode in ("int8", "bf16"):
        with pytest.raises(ExportError) as info:
            export_model(converted, config, prepare_quantized_params(config, params, mode), spec, tmp_path / "q",
                         log=lambda s: None)
        assert "quantised" in _one_line(info)
    other = dataclasses.replace(config, block_size=config.block_size // 2)
    with pytest.raises(ExportError) as info:
        export_model(converted, other, params, spec, tmp_path / "c", log=lambda s: None)
    assert "block_size" in _one_line(info)
    assert list(tmp_path.iterdir()) == []


def test_other_components_are_linked_or_copied(converted, stage, tmp_path, monkeypatch):
    weights = sorted(p for p in (converted / "second_stage").rglob("*") if p.is_file())
    linked = export_model(converted, *stage, tmp_path / "linked", log=lambda s: None)
    assert all(os.path.samefile(p, linked / p.relative_to(converted)) for p in weights)  # one filesystem here

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(export_mod.os, "link", no_links)
    copied = export_model(converted, *stage, tmp_path / "copied", log=lambda s: None)
    assert not any(os.path.samefile(p, copied / p.relative_to(converted)) for p in weights)
    assert _files(copied / "second_stage") == _files(converted / "second_stage")
    load_gpt_stage(copied, "second_stage", verify=True)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_export_leaves_nothing(converted, stage, tmp_path, monkeypatch, failure):
    real = export_mod.save_tree

    def failing(path, tree):
        real(path, tree)  # the parameters are on disk, the manifest is not yet
        raise failure

    monkeypatch.setattr(export_mod, "save_tree", failing)
    out = tmp_path / "new" / "deeper" / "tuned"
    with pytest.raises(type(failure)):
        export_model(converted, *stage, out, torch=True, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []  # no OUT, no staging directory, no parent created for it

    # Replacing an existing export: the old one survives the failure untouched.
    monkeypatch.setattr(export_mod, "save_tree", real)
    keep = tmp_path / "keep"
    export_model(converted, *stage, keep, log=lambda s: None)
    before = _files(keep)
    monkeypatch.setattr(export_mod, "save_tree", failing)
    with pytest.raises(type(failure)):
        export_model(converted, *stage, keep, overwrite=True, log=lambda s: None)
    assert _files(keep) == before and [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_cli_runs_restore_then_export(converted, stage, tmp_path, monkeypatch, capsys):
    """``finetune export`` with a stand-in for the training side's ``restore_for_export``."""
    from mvjax.cli import finetune_export
    from mvjax.cli.common import guarded

    config, params, spec = stage
    calls = []

    def restore_for_export(run_dir, step):
        calls.append((Path(run_dir), step))
        return types.SimpleNamespace(base_model=converted, config=config, params=params, step=7, tokenizer_spec=spec)

    fake = types.ModuleType("mvjax.train.checkpoints")
    fake.restore_for_export = restore_for_export
    monkeypatch.setitem(sys.modules, "mvjax.train.checkpoints", fake)

    def cli(*argv):
        parser = argparse.ArgumentParser()
        finetune_export.add_arguments(parser)
        return guarded(lambda: finetune_export.run(parser.parse_args(list(argv))))

    out = tmp_path / "model2"
    assert cli("--run", str(tmp_path / "run"), "--step", "best", "--out", str(out), "--quiet") == 0
    assert calls == [(tmp_path / "run", "best")]
    assert json.loads((out / MANIFEST).read_text())["finetuned"]["step"] == 7
    assert cli("--run", str(tmp_path / "run"), "--out", str(out)) == 1  # exists: refused before restoring
    assert len(calls) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert cli("--run", str(tmp_path / "run"), "--out", str(out), "--overwrite", "--step", "3", "--quiet") == 0
    assert calls[-1][1] == 3
    assert cli("--run", str(tmp_path / "run"), "--out", str(converted), "--overwrite") == 1
    assert "base model itself" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("--run", "r", "--out", "o", "--step", "soon")
