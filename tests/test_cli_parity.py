"""python -m mvjax.parity on the shared fixtures, and the torch-free runtime."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import REPO


def _parity(*args):
    return subprocess.run([sys.executable, "-m", "mvjax.parity", *args], capture_output=True, text=True, cwd=REPO)


def _all_passed(res) -> tuple[list[str], set]:
    """The tool exited 0 and printed only PASS lines: (those lines, their (component, check) pairs)."""
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [l for l in res.stdout.splitlines() if l.startswith(("PASS", "FAIL"))]
    assert lines and all(l.startswith("PASS") for l in lines)
    return lines, {tuple(l.split()[1:3]) for l in lines}


@pytest.mark.slow  # ~75-130 s; each comparison also has its own test in the default suite
def test_parity_tool_passes_implemented_components(fixtures):
    lines, checks = _all_passed(_parity(str(fixtures), "--only", "tokenizer,stage1-forward,stage1-decode,stage1-batch,"
                                                                  "stage2,speaker,encodec,mbd,pipeline,finetune"))
    for need in [("tokenizer", "stage1-ids"), ("stage1-forward", "logits-cond"), ("stage1-forward", "logits-uncond"),
                 ("stage1-decode", "gen0-seq"), ("stage1-decode", "gen0-step-logits"), ("stage1-batch", "batch-out"),
                 ("stage2", "logits"), ("stage2", "greedy"), ("speaker", "wav16"), ("speaker", "mels"),
                 ("speaker", "embedding-cosine"), ("speaker", "short3s-embedding-cosine"),
                 ("encodec", "recipe-sha256"), ("encodec", "decode"), ("encodec", "encode-codes"),
                 ("mbd", "splitbands32"), ("mbd", "unet0-step500"), ("mbd", "wav"),
                 ("pipeline", "speaker-embedding-cosine"), ("pipeline", "first-stage-tokens"),
                 ("pipeline", "all-codebooks"), ("finetune", "token-rows"), ("finetune", "train-losses"),
                 ("finetune", "grad-norms"), ("finetune", "step0-token-losses"), ("finetune", "val-loss-after"),
                 ("finetune", "param:transformer.ln_f.weight:all")]:
        assert need in checks
    for line in lines:
        assert "max_err=" in line and "tol=" in line


def test_parity_tool_passes_the_quick_components(fixtures):
    """The default suite runs the tool itself on its cheaper comparisons (all of them: ``-m slow``)."""
    _, checks = _all_passed(_parity(str(fixtures), "--only", "tokenizer,stage1-forward,stage1-decode,stage2"))
    assert {("tokenizer", "stage1-ids"), ("stage1-forward", "logits-cond"), ("stage1-decode", "gen0-seq"),
            ("stage2", "greedy")} <= checks


def test_parity_tool_fails_when_a_fixture_file_is_missing(fixtures, tmp_path):
    """A fixture set without pipeline_cases.npz: the pipeline component fails, the others still run."""
    for sub in ("stage1", "stage2", "speaker"):
        (tmp_path / sub).symlink_to(fixtures / sub)
    (tmp_path / "README.md").symlink_to(fixtures / "README.md")
    res = _parity(str(tmp_path), "--only", "stage1-forward,pipeline")
    assert res.returncode != 0
    assert any(l.startswith("FAIL pipeline fixture") and "pipeline_cases.npz" in l for l in res.stdout.splitlines())
    assert any(l.startswith("PASS stage1-forward") for l in res.stdout.splitlines())


def test_parity_tool_bad_arguments(tmp_path):
    res = _parity(str(tmp_path / "missing"), "--only", "stage2")
    assert res.returncode != 0 and "Traceback" not in res.stderr and "not found" in res.stderr
    res = _parity(str(tmp_path), "--only", "stage3")
    assert res.returncode == 2 and "unknown component" in res.stderr


def test_parity_tool_reports_missing_fixture_files(tmp_path):
    res = _parity(str(tmp_path), "--only", "stage2")
    assert res.returncode != 0 and "FAIL stage2 fixture" in res.stdout and "Traceback" not in res.stderr


def test_runtime_never_imports_torch(converted, fixtures):
    """Loading a converted model and running both stages works with torch made unimportable."""
    script = textwrap.dedent(
        f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        from mvjax.io.checkpoint import load_gpt_stage
        from mvjax.nn.gpt import forward
        from mvjax.text.tokenizer import normalize_text
        s1 = np.load({str(fixtures / "stage1" / "stage1_cases.npz")!r})
        cfg, params, tok = load_gpt_stage({str(converted)!r}, "first_stage", verify=True)
        ids = tok.encode(normalize_text("Hello world"))
        out = forward(cfg, params, s1["fwd_idx"], s1["fwd_spk"])[0]
        err = float(np.abs(np.asarray(out) - s1["fwd_logits_cond"]).max())
        tol = 1e-4 * max(1.0, float(np.abs(s1["fwd_logits_cond"]).max()))
        cfg2, params2, tok2 = load_gpt_stage({str(converted)!r}, "second_stage")
        forward(cfg2, params2, np.full((1, 2, cfg2.block_size), 1024), None)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
        print("OK", err, tol)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("OK")
    _, err, tol = res.stdout.split()
    assert float(err) <= float(tol)


def _documented_keys(fx):
    from mvjax.parity.fixture import DOCUMENTED_KEYS

    for rel in DOCUMENTED_KEYS:
        data = fx.npz(rel)
        assert fx.missing_keys(rel) == [], rel
        # the documented names as this fixture spells them (each case, row and band)
        full = dict(data)
        for key in DOCUMENTED_KEYS[rel]:
            if "{" not in key:
                yield rel, key
        for key in full:
            if any(key.startswith(p) for p in ("gen0_", "gen1_", "row", "unet")) and key != "unet_in":
                yield rel, key


def test_parity_fails_naming_each_missing_documented_key(fixtures, tmp_path):
    """Delete each documented fixture array in turn: the components reading that file FAIL naming it."""
    from mvjax.parity.checks import run_checks
    from mvjax.parity.fixture import COMPONENT_FILES, Fixture, FixtureArrays

    fx = Fixture(fixtures, tmp_path)
    pairs = sorted(set(_documented_keys(fx)))
    assert len(pairs) > 60
    for rel, key in pairs:
        original = fx._npz[rel]
        fx._npz[rel] = FixtureArrays(rel, {k: v for k, v in original.items() if k != key})
        try:
            readers = [c for c, files in COMPONENT_FILES.items() if rel in files]
            results = run_checks(fx, readers, emit=lambda line: None)
        finally:
            fx._npz[rel] = original
        assert {r.component for r in results} == set(readers), (rel, key)
        for r in results:
            assert not r.passed and r.name == "fixture" and repr(key) in r.note and rel in r.note, (rel, key, r)


def test_a_fully_masked_token_check_fails():
    from mvjax.parity.fixture import exact_check

    check = exact_check("stage2", "greedy", np.zeros((2, 3)), np.zeros((2, 3)), where=np.zeros((2, 3), bool))
    assert not check.passed and "nothing to compare" in check.note
    assert exact_check("stage2", "greedy", np.zeros(3), np.zeros(3), where=np.array([True, False, False])).passed


def test_parity_reports_its_matmul_policy(fixtures):
    res = _parity(str(fixtures), "--only", "stage1-forward", "--matmul-precision", "high")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[0] == "matmul precision: high"
    res = subprocess.run([sys.executable, "-m", "mvjax.parity", str(fixtures), "--only", "stage1-forward"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "MVJAX_MATMUL_PRECISION": "fast"})
    assert res.returncode == 1 and "MVJAX_MATMUL_PRECISION must be one of" in res.stderr and "Traceback" not in res.stderr
