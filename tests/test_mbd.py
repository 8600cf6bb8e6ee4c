"""Multi-band diffusion: safe config loading, U-Nets, sampler + re-EQ, band splitting, vocode CLI."""

import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import soundfile as sf

from convert_weights.convert import convert_directory
from convert_weights.safe_pickle import (
    OMEGACONF_ALLOWED,
    UnsafeCheckpointError,
    load_checkpoint,
)
from mvjax.audio.bands import split_bands
from mvjax.inference.diffusion import (
    MultiBandDiffusion,
    default_steps,
    plan_steps,
    re_eq,
)
from mvjax.io.checkpoint import load_mbd
from mvjax.nn.diffusion_config import NoiseScheduleConfig
from mvjax.nn.diffusion_unet import unet_apply
from tests.conftest import REPO


@pytest.fixture(scope="module")
def cases(fixtures):
    return dict(np.load(fixtures / "mbd" / "mbd_cases.npz"))


@pytest.fixture(scope="module")
def mbd(fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("mbd") / "model"
    convert_directory(fixtures / "mbd", out)
    return load_mbd(out, verify=True)


def test_config_comes_from_the_omegaconf_objects(mbd):
    config, params = mbd
    assert config.n_bands == 4 and config.sample_rate == 24000
    kinds = {(b.unet.transformer, b.unet.bilstm, b.unet.cross_attention) for b in config.bands}
    assert len(kinds) >= 2  # the fixture's bands differ in architecture
    for b, band in enumerate(config.bands):
        assert band.schedule.num_steps == 1000
        assert (f"processor_{b}" in params) == band.processor.use


def test_omegaconf_allow_list_still_refuses_other_globals(tmp_path):
    class Payload:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    path = tmp_path / "mbd_comp_8.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", pickle.dumps({"n_bands": 1, 0: {"cfg": Payload()}}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(path, OMEGACONF_ALLOWED)


def test_each_band_unet_matches(mbd, cases):
    config, params = mbd
    for b, band in enumerate(config.bands):
        ref = cases[f"unet{b}_out_step500"]
        out = np.asarray(unet_apply(band.unet, params[f"band_{b}"], cases["unet_in"], 500, cases["latent"]))
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), b


def test_sampler_and_re_eq_reproduce_the_reference(mbd, cases):
    model = MultiBandDiffusion(*mbd)
    assert model.noise_count() == cases["noises"].shape[0] == 4 * (1 + 19)
    diffused = model.generate(cases["latent"], cases["wav_encodec"].shape, noises=cases["noises"])
    assert np.abs(diffused - cases["wav_diffusion"]).max() <= 1e-3 * np.abs(cases["wav_diffusion"]).max()
    wav = re_eq(diffused, cases["wav_encodec"], 24000)
    assert np.abs(wav - cases["wav"]).max() <= 1e-3 * np.abs(cases["wav"]).max()
    # Drawn noise (no replay): a different but finite, EQ-matched waveform.
    free = model.tokens_to_wav(cases["latent"], cases["wav_encodec"], key=__import__("jax").random.PRNGKey(3))
    assert free.shape == cases["wav"].shape and np.all(np.isfinite(free)) and not np.allclose(free, cases["wav"])


def test_schedule_plan():
    assert default_steps()[:3] == [999, 949, 899] and default_steps()[-2:] == [49, 0] and len(default_steps()) == 21
    plan = plan_steps(NoiseScheduleConfig.from_dict({"num_steps": 1000, "beta_t0": 1e-5, "beta_t1": 0.029,
                                                     "beta_exp": 7.5, "clip": 5.0}))
    assert plan.noisy_steps == 19 and plan.noise_std[-1] == 0 and np.all(plan.noise_std[:-1] > 0)


def test_torch_linspace_is_one_fused_rounding():
    """torch's CPU linspace is ``start + step * i`` (``end - step * (n - 1 - i)`` past halfway) with one
    rounding (its vector kernels contract to an FMA): every value must be a nearest float32 of the exact
    rational result. Pure arithmetic, so it holds on any CPU."""
    from fractions import Fraction

    from mvjax.audio.bands import torch_linspace_f32

    rng = np.random.default_rng(0)
    f32 = np.float32
    for _ in range(200):
        count = int(rng.integers(2, 80))
        start = float(f32(rng.choice([0.0, rng.normal() * 100])))
        end = float(f32(start + abs(rng.normal()) * 3000 + 1))
        got = torch_linspace_f32(start, end, count)
        step = f32((f32(end) - f32(start)) / f32(count - 1))
        for i, value in enumerate(got):
            exact = Fraction(start) + Fraction(float(step)) * i if i < count // 2 else \
                Fraction(end) - Fraction(float(step)) * (count - 1 - i)
            err = abs(Fraction(float(value)) - exact)
            for neighbour in (np.nextafter(value, f32(np.inf)), np.nextafter(value, f32(-np.inf))):
                assert err <= abs(Fraction(float(neighbour)) - exact), (start, end, count, i)


def test_split_bands_matches_julius_and_sums_back(cases):
    for n in (8, 32):
        bands = split_bands(cases["splitbands_in"], 24000, n)
        assert np.abs(bands - cases[f"splitbands{n}_out"]).max() <= 1e-5
        np.testing.assert_allclose(bands.sum(axis=0), cases["splitbands_in"], atol=1e-5)


def _vocode(*args):
    return subprocess.run([sys.executable, "-m", "mvjax.vocode", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def vocoder_dir(fixtures, tmp_path_factory):
    """A model directory with the fixture's diffusion checkpoint and the recipe's codec."""
    src = tmp_path_factory.mktemp("voc_src")
    shutil.copy(fixtures / "mbd" / "mbd_comp_8.pt", src / "mbd_comp_8.pt")
    res = subprocess.run([sys.executable, str(fixtures / "make_random_encodec.py"), str(src / "encodec_24khz-d7cc33bc.th")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path_factory.mktemp("voc") / "model"
    convert_directory(src, out)
    return out


def test_vocode_raw_replays_the_reference(vocoder_dir, cases, tmp_path):
    np.savez(tmp_path / "tokens.npz", all_codebooks=cases["tokens"][0])
    np.save(tmp_path / "noises.npy", cases["noises"])
    res = _vocode("--model", str(vocoder_dir), "--tokens", str(tmp_path / "tokens.npz"), "--out", str(tmp_path / "o.wav"),
                  "--noises", str(tmp_path / "noises.npy"), "--raw")
    assert res.returncode == 0, res.stderr[-2000:]
    wav, rate = sf.read(tmp_path / "o.wav", dtype="float32")
    assert rate == 24000
    assert np.abs(wav - cases["wav"][0, 0]).max() <= 1e-3 * np.abs(cases["wav"]).max()
    res = _vocode("--model", str(vocoder_dir), "--tokens", str(tmp_path / "tokens.npz"), "--out", str(tmp_path / "c.wav"),
                  "--decoder", "encodec", "--raw")
    assert res.returncode == 0, res.stderr[-2000:]
    wav, _ = sf.read(tmp_path / "c.wav", dtype="float32")
    assert np.abs(wav - cases["wav_encodec"][0, 0]).max() <= 1e-4 * np.abs(cases["wav_encodec"]).max()
    # The finished product: loudness-normalised and enhanced, 48 kHz PCM.
    res = _vocode("--model", str(vocoder_dir), "--tokens", str(tmp_path / "tokens.npz"), "--out", str(tmp_path / "e.wav"))
    assert res.returncode == 0, res.stderr[-2000:]
    info = sf.info(tmp_path / "e.wav")
    assert info.samplerate == 48000 and info.subtype == "PCM_16"
    assert abs(info.frames - 2 * cases["wav"].shape[-1]) <= 1


def test_vocode_bad_inputs(vocoder_dir, cases, tmp_path):
    np.savez(tmp_path / "bad.npz", codes=cases["tokens"][0])
    np.savez(tmp_path / "ok.npz", all_codebooks=cases["tokens"][0])
    np.save(tmp_path / "short.npy", cases["noises"][:3])
    np.savez(tmp_path / "range.npz", all_codebooks=cases["tokens"][0] + 5000)
    runs = [
        (["--tokens", str(tmp_path / "bad.npz"), "--raw"], "all_codebooks"),
        (["--tokens", str(tmp_path / "ok.npz"), "--raw", "--noises", str(tmp_path / "short.npy")], "draws"),
        (["--tokens", str(tmp_path / "range.npz"), "--raw"], "ids"),
        (["--tokens", str(tmp_path / "missing.npz"), "--raw"], "cannot read"),
    ]
    for extra, message in runs:
        res = _vocode("--model", str(vocoder_dir), "--out", str(tmp_path / "x.wav"), *extra)
        assert res.returncode != 0 and message in res.stderr, (extra, res.stderr)
        assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
        assert not (tmp_path / "x.wav").exists()
