"""int8 / bf16 first-stage weights (int4: tests/test_int4.py): quantiser bounds, the CPU kernel, decoding fidelity on the
fixture, quantised conversion, and the command-line options."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvjax.inference import fidelity as F
from mvjax.inference.decode import FirstStageDecoder
from mvjax.inference.keys import utterance_keys
from mvjax.inference.options import SamplingConfig
from mvjax.io import quantize as Q
from mvjax.io.checkpoint import load_gpt_stage, read_manifest, tree_digest
from mvjax.kernels import cpu_int8 as cpu_kernels
from mvjax.kernels import int8 as K
from mvjax.nn.kv_cache import KV_CACHE_KINDS
from tests.conftest import REPO
from tests.kernel_util import assert_nonfinite_as_float, put_nonfinite


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
    err = np.abs(np.asarray(_dequantized(entry)) - w)
    assert np.all(err <= scale[:, None] * (0.5 + 1e-5))
    # Only row 5 pays for its outlier.
    assert np.median(err[5]) > 10 * np.median(err[np.arange(64) != 5])
    # Values on the grid quantise to the same codes again.
    np.testing.assert_array_equal(np.asarray(Q.quantize_rows(_dequantized(entry))["q"]), q)


def test_check_mode():
    assert Q.check_mode(None) is None and Q.check_mode("float32") is None
    assert Q.check_mode("int8") == "int8" and Q.check_mode("bf16") == "bf16"
    assert Q.check_mode("int4") == "int4"
    with pytest.raises(ValueError, match="int8, bf16, int4"):
        Q.check_mode("int2")


# --- the int8 product: CPU kernel and plain-XLA fallback ---------------------------------------
def _dequantized(entry):
    """The float32 matrix an int8 entry stands for."""
    return jnp.asarray(entry["q"], jnp.float32) * jnp.asarray(entry["scale"])[:, None]


KERNEL_CALL = re.compile(r"custom_call\s*@" + re.escape(cpu_kernels.TARGET) + r"\b")


def _decoder_matmul():
    """The decoder's own int8 product (``gpt_decode._matmul`` -> ``Q.int8_matmul``) under a jit of
    a new function object, so it is traced afresh and its dispatch sees the current
    ``int8_matmul_available`` (re-jitting a function traced before reuses that trace)."""
    from mvjax.nn.gpt_decode import _matmul

    return jax.jit(lambda entry, x: _matmul(entry, x))


@pytest.fixture(params=["kernel", "fallback"])
def int8_path(request, monkeypatch):
    """``kernel``: the C++ kernel (skipped, with the reason, where it cannot be built: the
    ``fallback`` case of the same test still runs). ``fallback``: the kernel reported
    unavailable, as on a machine without a compiler or AVX2, so the decoder uses plain XLA."""
    if request.param == "kernel":
        if not K.int8_kernel_used():
            why = cpu_kernels._state.get("why") or f"backend {jax.default_backend()}"
            pytest.skip(f"int8 CPU kernel unavailable here ({why}); only the fallback case runs")
    else:
        monkeypatch.setattr(cpu_kernels, "int8_matmul_available", lambda: False)
        assert not K.int8_kernel_used()
    return request.param


def _int8_product(path, entry, x):
    """Run the decoder's int8 product, after checking that the lowered program calls the
    kernel exactly when ``path`` is ``kernel``."""
    f = _decoder_matmul()
    calls = KERNEL_CALL.findall(f.lower(entry, jnp.asarray(x)).as_text())
    assert len(calls) == (1 if path == "kernel" else 0), (path, calls)
    got = np.asarray(f(entry, jnp.asarray(x)))
    assert got.shape == (entry["q"].shape[0], x.shape[1]) and got.dtype == np.float32
    return got


def _reference(entry, x):
    """Float64 product of the dequantised weights, elementwise (IEEE: 0 * inf = NaN, inf - inf = NaN)."""
    w = np.asarray(_dequantized(entry), np.float64)
    with np.errstate(invalid="ignore"):
        return (w[:, :, None] * np.asarray(x, np.float64)[None, :, :]).sum(axis=1)


def _error_bound(path, entry, x):
    """Kernel: activation rounding, |error| <= 0.5 / 16383 of each column's largest entry times
    sum |w| (products and sums are exact). Fallback: float32 dot, well inside 1e-5 of |w| @ |x|."""
    w = np.abs(np.asarray(_dequantized(entry), np.float64))
    x = np.abs(np.asarray(x, np.float64))
    if path == "kernel":
        return w.sum(1)[:, None] * x.max(0)[None, :] * 0.5 / cpu_kernels.ACTIVATION_MAX * 1.01 + 1e-6 * (w @ x)
    return 1e-5 * (w @ x)


@pytest.mark.parametrize("out,k,n", [(37, 19, 1), (64, 2048, 2), (130, 300, 5), (48, 4100, 3), (40, 9000, 16), (301, 160, 7), (25, 48, 2), (97, 33, 11)])
def test_int8_matmul_matches_dequantised(int8_path, out, k, n):
    """The decoder's int8 product equals the float64 product of the dequantised weights, through
    the CPU kernel (int8 weights, 15-bit activations, exact int32 sums; K above one 4096 block)
    and through the plain-XLA fallback."""
    rng = np.random.default_rng(out + k + n)
    entry = Q.quantize_rows(jnp.asarray(rng.standard_normal((out, k)), jnp.float32))
    x = rng.standard_normal((k, n)).astype(np.float32)
    x[0] *= 50  # an outlier feature
    if n > 2:
        x[:, 1] = 0.0  # an all-zero column (scale 1, output 0)
    got = _int8_product(int8_path, entry, x)
    want = _reference(entry, x)
    err = np.abs(got - want)
    bound = _error_bound(int8_path, entry, x)
    assert np.all(err <= bound), (err / bound).max()
    if n > 2:
        assert not got[:, 1].any()


def _nonfinite_case(n):
    """Weights with exact zeros and both signs at the non-finite positions; activation columns:
    NaN, +inf alone, -inf and +inf together, NaN and inf together, then finite ones (n == 1: the
    mixed-inf column alone)."""
    rng = np.random.default_rng(n)
    out, k = 30, 70
    w = rng.standard_normal((out, k)).astype(np.float32)
    w[::4, 2] = 0.0  # 0 * inf = NaN in these rows
    w[1::4, 9] = 0.0
    w[:10, 9] = np.abs(w[:10, 9])  # rows where +inf at 9 and -inf at 2 ...
    w[:10, 2] = np.abs(w[:10, 2])  # ... meet opposite signs (NaN)
    w[10:20, 2] = -np.abs(w[10:20, 2])  # and rows where they agree (+inf)
    w[10:20, 9] = np.abs(w[10:20, 9])
    entry = Q.quantize_rows(jnp.asarray(w))
    x = rng.standard_normal((k, n)).astype(np.float32)
    touched = put_nonfinite(x)
    return entry, x, touched


@pytest.mark.parametrize("n", [1, 6])
def test_int8_matmul_propagates_nonfinite(int8_path, n):
    """NaN/inf activations give what float arithmetic gives, on both paths: NaN in every output
    of a NaN column, +-inf or NaN row by row in an inf column (weight signs, 0 * inf), and the
    other columns finite and correct (integer codes cannot hold NaN/inf: before the fix the
    kernel gave finite garbage for NaN and NaN for inf)."""
    entry, x, n_bad = _nonfinite_case(n)
    got = _int8_product(int8_path, entry, x)
    want = _reference(entry, x)
    assert_nonfinite_as_float(got, want, n_bad)
    fin = np.s_[:, n_bad:]
    assert np.all(np.abs(got[fin] - want[fin]) <= _error_bound(int8_path, entry, x[fin]))


@pytest.mark.parametrize("reason", ["no compiler", "disabled"])
def test_int8_kernel_unavailable_uses_xla(monkeypatch, tmp_path, reason):
    """The availability check itself, run afresh: without a C++ compiler on PATH (and no CXX),
    or with MVJAX_CPU_KERNELS=0, it reports the kernel unavailable with the reason, and the
    decoder's int8 product lowers to no kernel call and is still right."""
    monkeypatch.setattr(cpu_kernels, "_state", {})  # forget the earlier answer (restored afterwards)
    if reason == "no compiler":
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.setenv("MVJAX_CPU_KERNELS", "1")
        monkeypatch.setattr(cpu_kernels, "_cpu_has_avx2_fma", lambda: True)  # reach the compiler lookup anywhere
        assert cpu_kernels._compiler() is None
    else:
        monkeypatch.setenv("MVJAX_CPU_KERNELS", "0")
    assert not cpu_kernels.int8_matmul_available() and not K.int8_kernel_used()
    assert cpu_kernels._state["why"] == {"no compiler": "no C++ compiler found (set CXX)",
                                         "disabled": "disabled by MVJAX_CPU_KERNELS"}[reason]
    entry, x, n_bad = _nonfinite_case(5)
    got = _int8_product("fallback", entry, x)
    want = _reference(entry, x)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.s_[:, n_bad:]
    assert np.all(np.abs(got[fin] - want[fin]) <= _error_bound("fallback", entry, x[fin]))


_NO_COMPILER_SCRIPT = """
import json, numpy as np, jax, jax.numpy as jnp
from mvjax.kernels import cpu_int8 as cpu_kernels
from mvjax.inference import fidelity as F
from mvjax.io import quantize as Q
from mvjax.kernels import int8 as K
from mvjax.nn.kv_cache import KV_CACHE_KINDS
from mvjax.nn.gpt_decode import _matmul
rng = np.random.default_rng(3)
entry = Q.quantize_rows(jnp.asarray(rng.standard_normal((50, 300)), jnp.float32))
x = rng.standard_normal((300, 3)).astype(np.float32)
f = jax.jit(lambda e, x: _matmul(e, x))
print(json.dumps({"compiler": cpu_kernels._compiler(), "available": cpu_kernels.int8_matmul_available(),
                  "why": cpu_kernels._state.get("why"), "hlo": f.lower(entry, x).as_text(),
                  "got": np.asarray(f(entry, x)).tolist()}))
"""


def test_int8_matmul_on_a_machine_without_a_compiler(tmp_path):
    """A fresh process with no C++ compiler (empty PATH, no CXX, an empty kernel cache), where the
    kernel was never registered: the decoder's int8 product runs the XLA fallback and is right."""
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "MVJAX_CPU_KERNELS")}
    (tmp_path / "bin").mkdir()
    env.update(PATH=str(tmp_path / "bin"), MVJAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _NO_COMPILER_SCRIPT], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["compiler"] is None and out["available"] is False
    assert out["why"] in ("no C++ compiler found (set CXX)", "needs an x86-64 Linux CPU with AVX2 and FMA")
    assert not KERNEL_CALL.search(out["hlo"])
    assert not (tmp_path / "cache").exists()  # nothing was built
    rng = np.random.default_rng(3)
    entry = Q.quantize_rows(jnp.asarray(rng.standard_normal((50, 300)), jnp.float32))
    x = rng.standard_normal((300, 3)).astype(np.float32)
    got, want = np.asarray(out["got"], np.float32), _reference(entry, x)
    assert np.all(np.abs(got - want) <= _error_bound("fallback", entry, x))


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
                           SamplingConfig(guidance_scale=g, temperature=0.0, top_p=None), max_new_tokens=60)
        out.append((prompt, spk, g, res.sequences[0]))
    return out


def _teacher_forced(config, params, continuations, kv_cache="float32"):
    """Guided logits along every continuation (right-padded; a compact cache token by token), per
    case at its generated positions."""
    seqs = [seq for _, _, _, seq in continuations]
    padded = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, seq in enumerate(seqs):
        padded[i, : len(seq)] = seq
    spk = np.stack([spk for _, spk, _, _ in continuations])
    guidance = np.array([g for _, _, g, _ in continuations], np.float32)
    logits = np.asarray(F.guided_logits(config, params, padded, spk, guidance, kv_cache))
    return [logits[i, len(prompt) - 1: len(seq) - 1] for i, (prompt, _, _, seq) in enumerate(continuations)]


@pytest.mark.parametrize("mode,kv_cache", [("int8", "float32"), ("bf16", "float32"), ("float32", "bf16"),
                                           ("float32", "int8"), ("bf16", "bf16"), ("int8", "int8")])
def test_quantized_decode_matches_float32(stage1, continuations, mode, kv_cache):
    """Teacher-forced along float32's greedy continuations, with quantised weights and/or a compact
    KV cache (read token by token, as decoding does: on this CPU through the cache kernel): the
    guided next-token distributions stay within KL 0.01 nats on average and the greedy token
    agrees at >= 95 % of positions (the issue's fidelity bar for compact storage)."""
    config, params, tok = stage1
    q_params = Q.decoder_params(config, params, quantize=None if mode == "float32" else mode)
    assert Q.decode_params_mode(q_params) == (None if mode == "float32" else mode)
    ref = np.concatenate(_teacher_forced(config, Q.decoder_params(config, params), continuations))
    got = np.concatenate(_teacher_forced(config, q_params, continuations, kv_cache))
    cmp = F.compare_logits(ref, got)
    kl, agree = np.asarray(cmp["kl"]), np.asarray(cmp["agree"])
    assert kl.size >= 150
    assert kl.mean() <= 0.01, kl.mean()
    assert agree.mean() >= 0.95, agree.mean()


@pytest.mark.parametrize("kv_cache", ["float32", "int8"])
def test_int8_decoder_generates_like_float32(stage1, continuations, kv_cache):
    """The int8 decoder's own greedy decode (KV cache, guidance) of the first fixture prompt."""
    config, params, tok = stage1
    dec = FirstStageDecoder(config, params, end_of_audio=tok.offset - 1, quantize="int8", kv_cache=kv_cache)
    assert dec.quantize == "int8" and dec.kv_cache == kv_cache
    # The layers' matrices shrink to a quarter (plus a float32 scale per row); wte stays float32.
    assert Q.tree_nbytes(dec.params["layers"]) < 0.3 * Q.tree_nbytes(Q.decoder_params(config, params)["layers"])
    prompt, spk, g, want = continuations[0]
    res = dec.generate([prompt.tolist()], spk[None], utterance_keys(0, 1),
                       SamplingConfig(guidance_scale=g, temperature=0.0, top_p=None), max_new_tokens=60)
    got = res.sequences[0]
    n = min(len(got), len(want))
    assert np.mean(got[:n] == want[:n]) >= 0.95


def test_quantized_tree_quantises_each_relaid_matrix(stage1):
    """Quantising while re-laying gives, matrix by matrix, the int8 rows of the re-laid float tree."""
    from mvjax.nn.gpt_decode import prepare_decode_params

    config, params, _ = stage1
    direct = Q.prepare_quantized_params(config, params, "int8")
    floats = prepare_decode_params(config, params)
    for group in ("attn", "mlp"):
        for name, p in floats["layers"][0][group].items():
            want = Q.quantize_rows(p["w"])
            np.testing.assert_array_equal(np.asarray(direct["layers"][0][group][name]["w"]["q"]), np.asarray(want["q"]))
    assert not Q.is_quantized(direct["wte"]) and Q.is_quantized(direct["speaker_proj"])
    assert Q.is_quantized(Q.prepare_quantized_params(config, params, "int8", embedding=True)["wte"])
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), Q.abstract_decode_params(config, "int8"))
    assert shapes == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), direct)


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
    from mvjax.inference.pipeline import TTS

    assert TTS.load(converted, mesh=None, speaker_cache_dir=None).first_stage_decoder.quantize is None
    assert TTS.load(converted, mesh=None, speaker_cache_dir=None).first_stage_decoder.kv_cache == "float32"
    assert TTS.load(converted, mesh=None, speaker_cache_dir=None, kv_cache="int8").first_stage_decoder.kv_cache == "int8"
    with pytest.raises(ValueError, match="unknown KV cache kind"):
        TTS.load(converted, mesh=None, speaker_cache_dir=None, kv_cache="int4")
    assert TTS.load(converted, mesh=None, speaker_cache_dir=None, quantize="int8").first_stage_decoder.quantize == "int8"
    assert TTS.load(quantized_dir, mesh=None, speaker_cache_dir=None).first_stage_decoder.quantize == "int8"


# --- command lines -------------------------------------------------------------------------
def test_cli_flags_parse(tmp_path, converted, monkeypatch):
    from convert_weights.__main__ import main as convert_main
    from mvjax.cli import synthesize

    args = synthesize._parser().parse_args(["--model", "m", "--text", "hi", "--out", "o.wav", "--quantize", "int8"])
    assert args.quantize == "int8"
    assert synthesize._parser().parse_args(["--model", "m", "--text", "hi", "--out", "o.wav"]).quantize is None
    assert synthesize._parser().parse_args(["--model", "m", "--text", "hi", "--out", "o.wav", "--kv-cache", "bf16"]).kv_cache == "bf16"
    assert synthesize._parser()._option_string_actions["--kv-cache"].choices == list(KV_CACHE_KINDS)
    with pytest.raises(SystemExit):
        synthesize._parser().parse_args(["--model", "m", "--text", "hi", "--out", "o.wav", "--kv-cache", "int4"])
    for bad in (["--quantize", "int2"],):
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

    monkeypatch.setattr("mvjax.inference.pipeline.TTS.load", fake_load)
    monkeypatch.setattr(synthesize, "enable_compilation_cache", lambda *a, **k: None)
    emb = tmp_path / "spk.npy"
    np.save(emb, np.ones(256, np.float32))
    with pytest.raises(Stop):
        synthesize.run(["--model", str(converted), "--text", "Hello.", "--speaker-embedding", str(emb),
                        "--out", str(tmp_path / "o.wav"), "--quantize", "bf16", "--kv-cache", "int8", "--quiet"])
    assert seen["quantize"] == "bf16" and seen["kv_cache"] == "int8" and seen["path"] == str(converted)


@pytest.mark.slow
def test_quantize_benchmark_quick():
    """benchmarks/quantize.py --quick: a subprocess per mode at the fixture's size (about a minute)."""
    res = subprocess.run([sys.executable, "benchmarks/quantize.py", "--quick"], capture_output=True, text=True,
                         cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    speed = re.findall(r"^quantize-speed config=tiny mode=(\w+) batch=1 tokens_per_s=([0-9.]+)", res.stdout, re.M)
    assert sorted(m for m, _ in speed) == ["bf16", "float32", "int4", "int8"] and all(float(v) > 0 for _, v in speed)
    fid = dict(re.findall(r"^quantize-fidelity inputs=fixture mode=int8 mean_kl=(\S+) max_kl=\S+ greedy_agree=(\S+)",
                          res.stdout, re.M))
    assert fid, res.stdout[-2000:]
    kl, agree = next(iter(fid.items()))
    assert float(kl) <= 0.01 and float(agree) >= 0.95
    assert "Targets" in res.stdout
