"""int8 / bf16 first-stage weights: quantiser bounds, the CPU kernel, decoding fidelity on the
fixture, quantised conversion, and the command-line options."""

import json
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvjax import cpu_kernels
from mvjax import quantize as Q
from mvjax.checkpoint import load_gpt_stage, read_manifest, tree_digest
from mvjax.decode import FirstStageDecoder, SamplingConfig, utterance_keys
from tests.conftest import REPO


# --- quantiser ---------------------------------------------------------------------------
def test_quantize_rows_error_bounds():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 300)).astype(np.float32) * rng.uniform(1e-3, 10, (64, 1)).astype(np.float32)
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 500.0  # an outlier only widens its own row's step
    entry = Q.quantize_rows(jnp.asarray(w))
    q, scale = np.asarray(entry["q"]), np.asarray(entry["scale"])
    assert q.dtype == np.int8 and q.shape == w.shape and scale.dtype == np.float32 and scale.shape == (64,)
    assert np.abs(q.astype(int)).max() <= 127
    amax = np.abs(w).max(axis=1)
    np.testing.assert_allclose(scale[amax > 0], amax[amax > 0] / 127, rtol=1e-6)
    assert scale[3] == 1.0 and not q[3].any()
    # Every row's largest magnitude maps to +-127, and no element is off by more than half a step.
    assert np.all(np.abs(q[amax > 0]).max(axis=1) == 127)
    err = np.abs(np.asarray(Q.dequantize(entry)) - w)
    assert np.all(err <= scale[:, None] * (0.5 + 1e-5))
    # Only row 5 pays for its outlier.
    assert np.median(err[5]) > 10 * np.median(err[np.arange(64) != 5])
    # Values on the grid quantise to the same codes again.
    np.testing.assert_array_equal(np.asarray(Q.quantize_rows(Q.dequantize(entry))["q"]), q)


def test_check_mode():
    assert Q.check_mode(None) is None and Q.check_mode("float32") is None
    assert Q.check_mode("int8") == "int8" and Q.check_mode("bf16") == "bf16"
    with pytest.raises(ValueError, match="int8, bf16"):
        Q.check_mode("int4")


@pytest.mark.parametrize("out,k,n", [(37, 19, 1), (64, 2048, 2), (130, 300, 5), (48, 4100, 3), (40, 9000, 16), (301, 160, 7), (25, 48, 2), (97, 33, 11)])
def test_int8_matmul_matches_dequantised(out, k, n):
    """The CPU kernel (int8 weights, 15-bit activations, exact int32 sums; K above one 4096 block)
    and the XLA fallback both equal the float64 product of the dequantised weights."""
    rng = np.random.default_rng(out + k + n)
    entry = Q.quantize_rows(jnp.asarray(rng.standard_normal((out, k)), jnp.float32))
    x = rng.standard_normal((k, n)).astype(np.float32)
    x[0] *= 50  # an outlier feature
    if n > 2:
        x[:, 1] = 0.0  # an all-zero column (scale 1, output 0)
    want = np.asarray(Q.dequantize(entry), np.float64) @ x.astype(np.float64)
    assert cpu_kernels.int8_matmul_available(), cpu_kernels._state.get("why")
    got = np.asarray(jax.jit(Q.int8_matmul)(entry, jnp.asarray(x)))
    assert got.shape == (out, n) and got.dtype == np.float32
    # Activation rounding: |error| <= 0.5 / 16383 of each column's largest entry, times sum |w|.
    bound = (np.abs(np.asarray(Q.dequantize(entry), np.float64)).sum(1)[:, None]
             * np.abs(x).max(0)[None, :] * 0.5 / cpu_kernels.ACTIVATION_MAX)
    assert np.all(np.abs(got - want) <= bound * 1.01 + 1e-5 * np.abs(want))
    fallback = np.asarray(jnp.dot(Q.dequantize(entry), jnp.asarray(x), precision="highest"))
    np.testing.assert_allclose(fallback, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_int8_matmul_without_the_kernel(monkeypatch):
    """Where the kernel cannot be built, XLA dequantises: same result."""
    rng = np.random.default_rng(1)
    entry = Q.quantize_rows(jnp.asarray(rng.standard_normal((24, 40)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((40, 3)), jnp.float32)
    with_kernel = np.asarray(jax.jit(Q.int8_matmul)(entry, x))
    monkeypatch.setattr(cpu_kernels, "int8_matmul_available", lambda: False)
    without = np.asarray(jax.jit(Q.int8_matmul)(entry, x))
    np.testing.assert_allclose(without, with_kernel, rtol=1e-4, atol=1e-4)


# --- decoding on the fixture --------------------------------------------------------------
@pytest.fixture(scope="module")
def stage1(converted):
    return load_gpt_stage(converted, "first_stage")


def _cases(fixtures):
    d = np.load(fixtures / "stage1" / "stage1_cases.npz")
    return [(d[f"{g}_prompt"].astype(np.int32), d[f"{g}_spk"].reshape(-1), float(d[f"{g}_guidance"]))
            for g in ("gen0", "gen1")] + [
        (d["batch_prompt"][i, 0, : d["batch_lens"][i]].astype(np.int32), d["batch_spk"][i], 3.0) for i in (1, 2)]


@pytest.fixture(scope="module")
def continuations(stage1, fixtures):
    """Float32 greedy continuations of the fixture prompts (60 tokens, or to end of audio)."""
    config, params, tok = stage1
    dec = FirstStageDecoder(config, params, end_of_audio=tok.offset - 1)
    out = []
    for prompt, spk, g in _cases(fixtures):
        res = dec.generate([prompt.tolist()], spk[None], utterance_keys(0, 1),
                           SamplingConfig(guidance=g, temperature=0.0, top_p=None), max_new_tokens=60)
        out.append((prompt, spk, g, res.sequences[0]))
    return out


def _teacher_forced(config, params, continuations):
    """Guided logits along every continuation in one pass (right-padded), per case at its generated positions."""
    seqs = [seq for _, _, _, seq in continuations]
    padded = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, seq in enumerate(seqs):
        padded[i, : len(seq)] = seq
    spk = np.stack([spk for _, spk, _, _ in continuations])
    guidance = np.array([g for _, _, g, _ in continuations], np.float32)
    logits = np.asarray(Q.guided_logits(config, params, padded, spk, guidance))
    return [logits[i, len(prompt) - 1: len(seq) - 1] for i, (prompt, _, _, seq) in enumerate(continuations)]


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_quantized_decode_matches_float32(stage1, continuations, mode):
    """Teacher-forced along float32's greedy continuations: the guided next-token distributions
    stay within KL 0.01 nats on average and the greedy token agrees at >= 95 % of positions."""
    config, params, tok = stage1
    q_params = Q.decoder_params(config, params, quantize=mode)
    assert Q.decode_params_mode(q_params) == mode
    ref = np.concatenate(_teacher_forced(config, Q.decoder_params(config, params), continuations))
    got = np.concatenate(_teacher_forced(config, q_params, continuations))
    cmp = Q.compare_logits(ref, got)
    kl, agree = np.asarray(cmp["kl"]), np.asarray(cmp["agree"])
    assert kl.size >= 150
    assert kl.mean() <= 0.01, kl.mean()
    assert agree.mean() >= 0.95, agree.mean()


def test_int8_decoder_generates_like_float32(stage1, continuations):
    """The int8 decoder's own greedy decode (KV cache, guidance) of the first fixture prompt."""
    config, params, tok = stage1
    dec = FirstStageDecoder(config, params, end_of_audio=tok.offset - 1, quantize="int8")
    assert dec.quantize == "int8"
    # The layers' matrices shrink to a quarter (plus a float32 scale per row); wte stays float32.
    assert Q.tree_nbytes(dec.params["layers"]) < 0.3 * Q.tree_nbytes(Q.decoder_params(config, params)["layers"])
    prompt, spk, g, want = continuations[0]
    res = dec.generate([prompt.tolist()], spk[None], utterance_keys(0, 1),
                       SamplingConfig(guidance=g, temperature=0.0, top_p=None), max_new_tokens=60)
    got = res.sequences[0]
    n = min(len(got), len(want))
    assert np.mean(got[:n] == want[:n]) >= 0.95


def test_quantize_decode_params_of_a_prepared_tree(stage1):
    """Quantising the re-laid float tree gives what quantising while re-laying gives."""
    from mvjax.nn.gpt_decode import prepare_decode_params

    config, params, _ = stage1
    direct = Q.prepare_quantized_params(config, params, "int8")
    later = Q.quantize_decode_params(prepare_decode_params(config, params), "int8")
    assert tree_digest(direct) == tree_digest(later)
    assert not Q.is_quantized(direct["wte"]) and Q.is_quantized(direct["speaker_proj"])
    assert Q.is_quantized(Q.prepare_quantized_params(config, params, "int8", embedding=True)["wte"])
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), Q.abstract_decode_params(config, "int8"))
    assert shapes == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), direct)
    with pytest.raises(ValueError, match="already quantised"):
        Q.quantize_decode_params(direct, "int8")


@pytest.mark.parametrize("mode", [None, "int8"])
def test_consuming_relayout_equals_copying_and_empties_the_input(stage1, mode):
    """``consume=True`` (how TTS.load builds its decoder) gives the same decode tree, leaves the
    caller's stacked kernels and embedding out of its tree (so they can be freed early), and
    leaves a tree that was not consumed untouched."""
    config, params, _ = stage1
    copy = jax.tree_util.tree_map(lambda a: a, params)  # new dicts, same arrays
    want = Q.decoder_params(config, params, quantize=mode)
    got = Q.decoder_params(config, copy, quantize=mode, consume=True)
    assert tree_digest(got) == tree_digest(want)
    for group in ("attn", "mlp"):
        for name, dense in copy["blocks"][group].items():
            assert "kernel" not in dense, (group, name)
            assert "kernel" in params["blocks"][group][name]
    assert "embedding" not in copy["wte_0"] and "kernel" not in copy["speaker_proj"]
    assert "embedding" in params["wte_0"]


# --- conversion ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized_dir(fixtures, tmp_path_factory):
    from convert_weights.__main__ import main

    src = tmp_path_factory.mktemp("released_q")
    shutil.copy(fixtures / "stage1" / "first_stage.pt", src / "first_stage.pt")
    shutil.copy(fixtures / "stage2" / "second_stage.pt", src / "second_stage.pt")
    out = tmp_path_factory.mktemp("converted_q") / "model"
    assert main(["--model-dir", str(src), "--out", str(out), "--quantize", "int8", "--quiet"]) == 0
    return out


def test_quantized_conversion_round_trips(quantized_dir, converted, stage1):
    manifest = read_manifest(quantized_dir)
    entry = manifest["components"]["first_stage"]
    assert (entry["quantize"], entry["layout"], entry["quantize_embedding"]) == ("int8", "decode", False)
    # The second stage and the float path are untouched: same entries as a plain conversion.
    plain = read_manifest(converted)["components"]
    assert manifest["components"]["second_stage"] == plain["second_stage"]
    assert "quantize" not in plain["first_stage"]
    assert json.loads((quantized_dir / "first_stage" / "config.json").read_text()) == \
        json.loads((converted / "first_stage" / "config.json").read_text())

    config, params, _ = stage1
    cfg_q, loaded, _ = load_gpt_stage(quantized_dir, "first_stage", verify=True)
    assert cfg_q == config and Q.is_decode_layout(loaded)
    assert tree_digest(loaded) == tree_digest(Q.prepare_quantized_params(config, params, "int8"))
    layer = loaded["layers"][0]["attn"]["c_attn"]["w"]
    assert layer["q"].dtype == jnp.int8 and layer["scale"].dtype == jnp.float32

    dec = FirstStageDecoder(cfg_q, loaded, end_of_audio=1)
    assert dec.quantize == "int8" and dec.params is loaded  # used as stored: no float copy
    assert FirstStageDecoder(cfg_q, loaded, end_of_audio=1, quantize="int8").quantize == "int8"
    with pytest.raises(ValueError, match="stored as int8"):
        FirstStageDecoder(cfg_q, loaded, end_of_audio=1, quantize="bf16")


def test_tts_passes_quantize_through(converted, quantized_dir):
    from mvjax.pipeline import TTS

    assert TTS(converted, mesh=None, speaker_cache_dir=None).first_stage.quantize is None
    assert TTS(converted, mesh=None, speaker_cache_dir=None, quantize="int8").first_stage.quantize == "int8"
    assert TTS(quantized_dir, mesh=None, speaker_cache_dir=None).first_stage.quantize == "int8"


# --- command lines -------------------------------------------------------------------------
def test_cli_flags_parse(tmp_path, converted, monkeypatch):
    from convert_weights.__main__ import main as convert_main
    from mvjax import synthesize

    args = synthesize._parser().parse_args(["--model", "m", "--text", "hi", "--out", "o.wav", "--quantize", "int8"])
    assert args.quantize == "int8"
    assert synthesize._parser().parse_args(["--model", "m", "--text", "hi", "--out", "o.wav"]).quantize is None
    for bad in (["--quantize", "int4"],):
        with pytest.raises(SystemExit):
            synthesize._parser().parse_args(["--model", "m", "--text", "hi", "--out", "o.wav", *bad])
        with pytest.raises(SystemExit):
            convert_main(["--model-dir", "d", "--out", "o", *bad])

    # The synthesis CLI hands the option to TTS.load.
    seen = {}

    class Stop(Exception):
        pass

    def fake_load(path, **kwargs):
        seen.update(kwargs, path=path)
        raise Stop

    monkeypatch.setattr("mvjax.pipeline.TTS.load", fake_load)
    monkeypatch.setattr(synthesize, "enable_compilation_cache", lambda *a, **k: None)
    emb = tmp_path / "spk.npy"
    np.save(emb, np.ones(256, np.float32))
    with pytest.raises(Stop):
        synthesize.run(["--model", str(converted), "--text", "Hello.", "--speaker-embedding", str(emb),
                        "--out", str(tmp_path / "o.wav"), "--quantize", "bf16", "--quiet"])
    assert seen["quantize"] == "bf16" and seen["path"] == str(converted)


@pytest.mark.slow
def test_quantize_benchmark_quick():
    """benchmarks/quantize.py --quick: a subprocess per mode at the fixture's size (about a minute)."""
    res = subprocess.run([sys.executable, "benchmarks/quantize.py", "--quick"], capture_output=True, text=True,
                         cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    speed = re.findall(r"^quantize-speed config=tiny mode=(\w+) batch=1 tokens_per_s=([0-9.]+)", res.stdout, re.M)
    assert sorted(m for m, _ in speed) == ["bf16", "float32", "int8"] and all(float(v) > 0 for _, v in speed)
    fid = dict(re.findall(r"^quantize-fidelity inputs=fixture mode=int8 mean_kl=(\S+) max_kl=\S+ greedy_agree=(\S+)",
                          res.stdout, re.M))
    assert fid, res.stdout[-2000:]
    kl, agree = next(iter(fid.items()))
    assert float(kl) <= 0.01 and float(agree) >= 0.95
    assert "Targets" in res.stdout
