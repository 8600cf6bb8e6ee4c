"""EnCodec 24 kHz: conversion (weight norm folded), decode/encode against the encodec package."""

import subprocess
import sys
import types

import numpy as np
import pytest

from convert_weights.convert import convert_directory
from convert_weights.encodec import convert_encodec_state
from convert_weights.mapping import ConversionError
from convert_weights.safe_pickle import load_checkpoint
from mvjax.io.checkpoint import load_encodec
from mvjax.nn import encodec as E


@pytest.fixture(scope="module")
def codec_file(fixtures, tmp_path_factory):
    """The fixture recipe's random codec, in the released file layout."""
    src = tmp_path_factory.mktemp("codec")
    path = src / "encodec_24khz-d7cc33bc.th"
    res = subprocess.run([sys.executable, str(fixtures / "make_random_encodec.py"), str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    mb = np.load(fixtures / "mbd" / "mbd_cases.npz")
    assert res.stdout.strip().splitlines()[-1] == str(mb["encodec_state_sha256"]), "recipe mismatch"
    return path


@pytest.fixture(scope="module")
def codec(codec_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("codec_out") / "model"
    convert_directory(codec_file.parent, out)
    return load_encodec(out, verify=True)


@pytest.fixture(scope="module")
def torch_codec():
    if "torchaudio" not in sys.modules:
        try:
            import torchaudio  # noqa: F401
        except Exception:  # encodec imports it for file helpers only
            sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    import encodec
    import torch

    torch.manual_seed(5)
    model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    for i, layer in enumerate(model.quantizer.vq.layers):
        cb = layer._codebook
        with torch.no_grad():
            cb.embed.copy_(torch.randn(cb.embed.shape, generator=torch.Generator().manual_seed(5000 + i)))
            cb.embed_avg.copy_(cb.embed)
            cb.inited.fill_(1.0)
    return model.eval()


def test_fixture_latent_decode_and_encode(codec, fixtures):
    cfg, params = codec
    mb = np.load(fixtures / "mbd" / "mbd_cases.npz")
    latent = np.asarray(E.codes_to_latent(params, mb["tokens"]))
    assert np.abs(latent - mb["latent"]).max() <= 1e-4 * np.abs(mb["latent"]).max()
    wav = np.asarray(E.decode_latent(cfg, params, mb["latent"]))
    assert np.abs(wav - mb["wav_encodec"]).max() <= 1e-4 * np.abs(mb["wav_encodec"]).max()
    codes = np.asarray(E.encode_wav(cfg, params, mb["encode_in"], 6.0))
    assert np.mean(codes == mb["encode_codes"]) >= 0.99


@pytest.mark.parametrize("kbps,n_q", [(1.5, 2), (3.0, 4), (6.0, 8)])
def test_bandwidths_against_the_encodec_package(codec, torch_codec, kbps, n_q):
    import torch

    cfg, params = codec
    assert cfg.codebooks_for_bandwidth(kbps) == n_q
    rng = np.random.default_rng(int(kbps * 10))
    wav = (0.3 * np.sin(np.arange(24000 + 123) / 7.0) + 0.05 * rng.standard_normal(24000 + 123)).astype(np.float32)
    torch_codec.set_target_bandwidth(kbps)
    with torch.no_grad():
        ref_codes = torch_codec.encode(torch.from_numpy(wav)[None, None])[0][0].numpy()
        ref_wav = torch_codec.decode([(torch.from_numpy(ref_codes), None)]).numpy()
    codes = np.asarray(E.encode_wav(cfg, params, wav[None, None], kbps))
    assert codes.shape == ref_codes.shape == (1, n_q, ref_codes.shape[-1])
    assert np.mean(codes == ref_codes) >= 0.99
    out = np.asarray(E.decode_codes(cfg, params, ref_codes))
    assert out.shape == ref_wav.shape
    assert np.abs(out - ref_wav).max() <= 1e-4 * max(1e-3, np.abs(ref_wav).max())


def test_short_input_reflect_padding_matches(codec, torch_codec):
    """Inputs shorter than a padding width take the reference's zero-extend-then-reflect path."""
    import torch

    cfg, params = codec
    torch_codec.set_target_bandwidth(6.0)
    wav = np.linspace(-0.5, 0.5, 5, dtype=np.float32)
    with torch.no_grad():
        ref = torch_codec.encoder(torch.from_numpy(wav)[None, None]).numpy()
    ours = np.asarray(E.encode_latent(cfg, params, wav[None, None]))
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


def test_converter_refuses_unknown_and_names_missing_keys(codec_file):
    state = load_checkpoint(codec_file)
    state["decoder.model.99.conv.conv.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"decoder\.model\.99"):
        convert_encodec_state(state)
    state = load_checkpoint(codec_file)
    del state["decoder.model.4.block.3.conv.conv.weight_g"]
    with pytest.raises(ConversionError, match=r"decoder\.model\.4\.block\.3\.conv\.conv\.weight_g"):
        convert_encodec_state(state)
    state = load_checkpoint(codec_file)
    del state["encoder.model.13.lstm.bias_hh_l1"]
    with pytest.raises(ConversionError, match=r"encoder\.model\.13\.lstm\.bias_hh_l1"):
        convert_encodec_state(state)
