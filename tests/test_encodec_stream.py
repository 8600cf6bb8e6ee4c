"""EnCodec incremental decoding: the concatenated stream equals the whole decode of the same codes.

Tolerance: the streamed program computes the same float32 operations as the whole decode, only
summed in another order (a transposed convolution's overlap is added as two partial sums, and
XLA blocks convolutions and products differently for other lengths). Each such reassociation
changes a layer's output by a few float32 ulps relative (eps = 1.2e-7); through the decoder's
~20 layers, whose gains are of order 1, and at this codec's output scale (below 1, checked below),
that stays of order 1e-7..1e-6 (measured: below 1e-7). The issue's bound 1e-5 keeps a 10x margin
over that estimate, while a wrong carried state (a tail, an LSTM state or a bias counted twice)
changes samples by the order of the signal itself (1e-2 and more).
"""

import jax
import numpy as np
import pytest

from convert_weights.convert import convert_directory
from mvjax.io.checkpoint import load_encodec
from mvjax.nn import encodec as E

TOL = 1e-5
FRAMES = 75
WHOLE = jax.jit(E.decode_latent, static_argnums=0)


@pytest.fixture(scope="module")
def codec(released_model, tmp_path_factory):
    """The fixture recipe's random 24 kHz codec (the released shape), converted alone."""
    src = tmp_path_factory.mktemp("stream_codec_src")
    name = "encodec_24khz-d7cc33bc.th"
    (src / name).symlink_to(released_model / name)
    out = tmp_path_factory.mktemp("stream_codec") / "model"
    convert_directory(src, out)
    cfg, params = load_encodec(out, verify=True)
    return cfg, jax.device_put(params)


@pytest.fixture(scope="module")
def case(codec):
    """Random codes (2 rows, 8 codebooks, 75 frames), their latent and the whole decode."""
    cfg, params = codec
    codes = np.random.default_rng(29).integers(0, cfg.bins, (2, 8, FRAMES))
    latent = E.codes_to_latent(params, codes)
    whole = np.asarray(WHOLE(cfg, params, latent))
    assert whole.shape == (2, cfg.channels, FRAMES * cfg.hop_length)
    assert 1e-2 < np.abs(whole).max() < 1.0  # the scale the tolerance above assumes
    return latent, whole


def stream(cfg, params, latent, sizes):
    state = E.decode_stream_init(cfg, params, latent.shape[0])
    outs, start = [], 0
    for n in sizes:
        state, y = E._STREAM_STEP(cfg, params, state, latent[..., start : start + n])
        outs.append(np.asarray(y))
        start += n
    assert start == latent.shape[-1]
    outs.append(np.asarray(E._STREAM_FLUSH(cfg, params, state)))
    return outs


@pytest.mark.parametrize("sizes", [(1, 3, 7, 16, FRAMES - 27), (1,) * FRAMES], ids=["uneven", "single_frames"])
def test_stream_equals_whole_decode(codec, case, sizes):
    cfg, params = codec
    latent, whole = case
    outs = stream(cfg, params, latent, sizes)
    hop, warm = cfg.hop_length, E.stream_warmup_frames(cfg)
    assert warm == 7
    # Held back until the warm-up; then everything so far, then F * hop per piece; the flush owes nothing.
    seen, expected = 0, []
    for n in sizes:
        expected.append(0 if seen + n < warm else (seen + n if seen < warm else n) * hop)
        seen += n
    assert [o.shape[-1] for o in outs] == expected + [0]
    wav = np.concatenate(outs, axis=-1)
    assert wav.shape == whole.shape == (2, cfg.channels, FRAMES * hop)
    assert np.abs(wav - whole).max() <= TOL


def test_short_stream_is_flushed_as_whole(codec, case):
    """A stream that ends before the warm-up emits nothing until the flush, which pads its start as the whole does."""
    cfg, params = codec
    latent, _ = case
    outs = stream(cfg, params, latent[..., :5], (2, 3))
    assert [o.shape[-1] for o in outs] == [0, 0, 5 * cfg.hop_length]
    assert np.abs(outs[-1] - np.asarray(WHOLE(cfg, params, latent[..., :5]))).max() <= TOL


def test_streaming_decoder_fixed_pieces(codec, case):
    """Fixed 16-frame pieces, an input split across them, and a short last piece padded with zero frames."""
    cfg, params = codec
    latent, whole = case
    dec = E.StreamingDecoder(cfg, params, 2, piece_frames=16)
    outs = [dec.push(latent[..., :5]), dec.push(latent[..., 5:40]), dec.push(latent[..., 40:], last=True)]
    # 5 frames held back; 16 + 16 of 40 run and 8 wait for a full piece; the last call runs 16 and pads 11 to 16.
    assert [o.shape[-1] for o in outs] == [0, 32 * cfg.hop_length, 43 * cfg.hop_length]
    assert np.abs(np.concatenate(outs, axis=-1) - whole).max() <= TOL
    with pytest.raises(RuntimeError):
        dec.push(latent[..., :1])


def test_non_causal_codec_refused():
    with pytest.raises(ValueError, match="causal"):
        E.decode_stream_init(E.EncodecConfig(causal=False), None, 1)
