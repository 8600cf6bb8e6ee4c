"""The converter: mapping-table errors, dtypes, prefixes, determinism, atomicity, CLI."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import convert_weights.convert as convert_mod
from convert_weights.convert import convert_directory
from convert_weights.gpt import convert_gpt_checkpoint
from convert_weights.mapping import ConversionError
from convert_weights.safe_pickle import load_checkpoint
from mvjax.io.checkpoint import (
    ModelDirError,
    load_gpt_stage,
    read_manifest,
    tree_digest,
)
from mvjax.nn.gpt import forward
from tests.torch_twin import model_args, save_checkpoint


def _first_stage(fixtures):
    return load_checkpoint(fixtures / "stage1" / "first_stage.pt")


def test_missing_key_is_named(fixtures):
    ckpt = _first_stage(fixtures)
    del ckpt["model"]["_orig_mod.transformer.h.1.attn.c_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing checkpoint key 'transformer\.h\.1\.attn\.c_proj\.weight'.*attn/c_proj/kernel"):
        convert_gpt_checkpoint(ckpt)


def test_missing_top_level_key_is_named(fixtures):
    ckpt = _first_stage(fixtures)
    del ckpt["model"]["_orig_mod.transformer.ln_f.weight"]
    with pytest.raises(ConversionError, match=r"missing checkpoint key 'transformer\.ln_f\.weight' for parameter 'ln_f/scale'"):
        convert_gpt_checkpoint(ckpt)


def test_unused_key_is_named(fixtures):
    ckpt = _first_stage(fixtures)
    ckpt["model"]["_orig_mod.transformer.h.0.attn.rotary.inv_freq"] = np.zeros(4, np.float32)
    with pytest.raises(ConversionError, match=r"unused checkpoint key 'transformer\.h\.0\.attn\.rotary\.inv_freq'"):
        convert_gpt_checkpoint(ckpt)


def test_extra_layer_is_an_unused_key(fixtures):
    ckpt = _first_stage(fixtures)
    ckpt["model"]["_orig_mod.transformer.h.2.ln_1.weight"] = np.ones(64, np.float32)
    with pytest.raises(ConversionError, match=r"unused checkpoint key 'transformer\.h\.2\.ln_1\.weight'"):
        convert_gpt_checkpoint(ckpt)


def test_misshaped_key_is_named(fixtures):
    ckpt = _first_stage(fixtures)
    w = ckpt["model"]["_orig_mod.speaker_cond_pos.weight"]
    ckpt["model"]["_orig_mod.speaker_cond_pos.weight"] = w[:, :128]
    with pytest.raises(ConversionError, match=r"'speaker_cond_pos\.weight' has shape \(128, 64\).*\(256, 64\)"):
        convert_gpt_checkpoint(ckpt)


def test_untied_head_in_causal_model_is_refused(fixtures):
    ckpt = _first_stage(fixtures)
    ckpt["model"]["_orig_mod.lm_heads.0.weight"] = ckpt["model"]["_orig_mod.lm_heads.0.weight"] + 1.0
    with pytest.raises(ConversionError, match=r"lm_heads\.0\.weight.*tied"):
        convert_gpt_checkpoint(ckpt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sources(dtype, tmp_path):
    args = model_args()
    (tmp_path / "src").mkdir()
    twin = save_checkpoint(tmp_path / "src" / "first_stage.pt", args, dtype=dtype, prefix="_orig_mod.")
    convert_directory(tmp_path / "src", tmp_path / "out")
    config, params, _ = load_gpt_stage(tmp_path / "out", "first_stage")
    assert all(np.asarray(p).dtype == np.float32 for p in _leaves(params))
    expect = twin.transformer.wtes[0].weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(params["wte_0"]["embedding"]), expect)
    idx = np.arange(12).reshape(1, 1, 12)
    with torch.no_grad():
        ref = twin(torch.from_numpy(idx))[0].numpy()
    np.testing.assert_allclose(np.asarray(forward(config, params, idx)[0]), ref, atol=2e-5, rtol=0)


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_converting_twice_is_identical(fixtures, tmp_path):
    a = convert_directory(fixtures / "stage2", tmp_path / "a")
    b = convert_directory(fixtures / "stage2", tmp_path / "b")
    assert a == b
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "a" / "second_stage" / name).read_bytes() == (tmp_path / "b" / "second_stage" / name).read_bytes()
    pa = load_gpt_stage(tmp_path / "a", "second_stage", verify=True)[1]
    pb = load_gpt_stage(tmp_path / "b", "second_stage", verify=True)[1]
    assert tree_digest(pa) == tree_digest(pb) == a["components"]["second_stage"]["params_sha256"]
    # Re-converting into an existing output replaces it with the same content.
    again = convert_directory(fixtures / "stage2", tmp_path / "a")
    assert again == a


def test_interrupted_conversion_leaves_nothing_that_loads(fixtures, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for sub, name in (("stage1", "first_stage.pt"), ("stage2", "second_stage.pt")):
        shutil.copy(fixtures / sub / name, src / name)
    calls = []
    real = convert_mod._convert_gpt

    def dies_on_second(path, dst):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, dst)

    monkeypatch.setattr(convert_mod, "CONVERTERS", {k: (n, dies_on_second) for k, (n, _) in convert_mod.CONVERTERS.items()})
    with pytest.raises(KeyboardInterrupt):
        convert_directory(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # staging directory cleaned up

    # An earlier good conversion survives an interrupted re-conversion untouched.
    monkeypatch.setattr(convert_mod, "CONVERTERS", {k: (n, real) for k, (n, _) in convert_mod.CONVERTERS.items()})
    good = convert_directory(src, tmp_path / "out")
    calls.clear()
    monkeypatch.setattr(convert_mod, "CONVERTERS", {k: (n, dies_on_second) for k, (n, _) in convert_mod.CONVERTERS.items()})
    with pytest.raises(KeyboardInterrupt):
        convert_directory(src, tmp_path / "out")
    assert read_manifest(tmp_path / "out") == good
    load_gpt_stage(tmp_path / "out", "first_stage", verify=True)


def test_directory_without_manifest_does_not_load(converted, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(ModelDirError, match="no manifest.json"):
        load_gpt_stage(broken, "first_stage")


def test_round_trip_convert_load_forward(converted, fixtures):
    manifest = json.loads((converted / "manifest.json").read_text())
    assert sorted(manifest["components"]) == ["first_stage", "second_stage"]
    s1 = np.load(fixtures / "stage1" / "stage1_cases.npz")
    config, params, _ = load_gpt_stage(converted, "first_stage", verify=True)
    logits = np.asarray(forward(config, params, s1["fwd_idx"], s1["fwd_spk"])[0])
    ref = s1["fwd_logits_cond"]
    assert np.abs(logits - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "convert_weights", *args], capture_output=True, text=True)


def test_cli_converts(fixtures, tmp_path):
    res = _cli("--model-dir", str(fixtures / "stage1"), "--out", str(tmp_path / "m"))
    assert res.returncode == 0, res.stderr
    assert "first_stage" in res.stdout
    assert read_manifest(tmp_path / "m")["components"]["first_stage"]["source"] == "first_stage.pt"


def test_cli_bad_inputs_give_one_line_errors(tmp_path):
    res = _cli("--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "m"))
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0 and "not found" in res.stderr
    (tmp_path / "empty").mkdir()
    res = _cli("--model-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "m"))
    assert res.returncode != 0 and "first_stage.pt" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "evil").mkdir()
    import pickle
    import zipfile

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, ("echo hacked",))

    with zipfile.ZipFile(tmp_path / "evil" / "first_stage.pt", "w") as z:
        z.writestr("a/data.pkl", pickle.dumps(Payload()))
    res = _cli("--model-dir", str(tmp_path / "evil"), "--out", str(tmp_path / "m"))
    assert res.returncode != 0 and "system" in res.stderr and "hacked" not in res.stdout + res.stderr
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert not (tmp_path / "m").exists()
