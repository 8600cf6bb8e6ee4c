"""Windowed (streaming) multi-band diffusion against the whole-chunk decode, on the fixture model.

    python -m benchmarks.stream_mbd [--quick] [--model DIR] [--windows 8 16 32 75] [--overlaps 0 2 4 8]
                                    [--lookaheads 0 4] [--skip-padded]

The chunk: fixture codes that come from speech (the MBD case's 40 tokens, the EnCodec case's 75
encoded frames of the reference's audio, the pipeline case's 37 frames, joined: 152 frames, 2 s;
``--quick``: the first 40), turned into a latent and a plain decoding by the fixture recipe's random
codec, diffused by the fixture's four-band ``mbd_comp_8.pt`` with one row key's noise. For each
window (W), overlap (O) and lookahead (R) the windowed decode (:mod:`mvjax.inference.diffusion_stream`)
is compared with the whole decode by SI-SDR (dB; higher is closer), for each re-EQ mode with the
amplitude crossfade, and for running EQ with the equal-power one:
  stream-mbd window=W overlap=O lookahead=R first_audio_frames=.. max_delay_frames=.. cost=..
      si_sdr_running=.. si_sdr_window=.. si_sdr_none=.. si_sdr_none_then_eq=.. si_sdr_running_power=..
``cost``: frames diffused over the chunk's frames. ``none`` compares the diffused sums before re-EQ;
``none_then_eq`` re-EQs the joined sum once at the end (not a stream). Without ``--quick`` a first
line compares the whole decode run at the padded length the batched decoder uses (its noise drawn
for that length) with the unpadded one: how much the whole decode itself moves with its length.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from mvjax.audio.metrics import si_sdr
from mvjax.inference.diffusion import MultiBandDiffusion, re_eq
from mvjax.inference.diffusion_stream import WindowSettings, decode_whole, decode_windowed, row_noise
from mvjax.nn import encodec

FIXTURES = Path(os.environ.get("MVJAX_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"
                               / "metavoice_ref"))
ROW_KEY = np.array([0, 29], np.uint32)


class MemoDiffusion:
    """A :class:`MultiBandDiffusion` whose ``generate`` remembers results by input, so settings that diffuse
    the same window (the re-EQ and fade variants) run it once."""

    def __init__(self, diffusion: MultiBandDiffusion):
        self.diffusion, self.sample_rate, self._done = diffusion, diffusion.sample_rate, {}

    def noise_count(self) -> int:
        return self.diffusion.noise_count()

    def generate(self, latent, shape, noises):
        digest = hashlib.sha1(np.ascontiguousarray(latent).tobytes() + np.ascontiguousarray(noises).tobytes())
        key = (tuple(shape), digest.hexdigest())
        if key not in self._done:
            self._done[key] = self.diffusion.generate(latent, shape, noises=noises)
        return self._done[key]


def fixture_codes(fixtures: Path) -> np.ndarray:
    """(8, 152) codes that come from speech (see the module)."""
    mbd = np.load(fixtures / "mbd" / "mbd_cases.npz")
    pipeline = np.load(fixtures / "pipeline_cases.npz")
    return np.concatenate([mbd["tokens"][0], mbd["encode_codes"][0], pipeline["all_codebooks"]], axis=1)


def load_models(fixtures: Path, model: Path | None):
    """(codec config, codec params, MultiBandDiffusion) of a converted model directory, or of the fixtures
    converted into a temporary one."""
    from mvjax.io.checkpoint import load_encodec, load_mbd

    if model is not None:
        cfg, params = load_encodec(model)
        return cfg, params, MultiBandDiffusion(*load_mbd(model))
    from mvjax.parity.fixture import Fixture

    fixture = Fixture(fixtures, Path(tempfile.mkdtemp(prefix="stream_mbd_")))
    _, cfg, params = fixture.encodec()
    return cfg, params, MultiBandDiffusion(*fixture.mbd())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 frames, W 16, O 0 and 4, R 0")
    parser.add_argument("--model", type=Path, help="a converted model directory with encodec and mbd (default: "
                        "convert the fixtures)")
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32, 75])
    parser.add_argument("--overlaps", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--lookaheads", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--skip-padded", action="store_true", help="leave out the padded whole decode's line")
    args = parser.parse_args(argv)
    if args.quick:
        args.windows, args.overlaps, args.lookaheads = [16], [0, 4], [0]

    cfg, codec_params, diffusion = load_models(args.fixtures, args.model)
    hop, rate = cfg.hop_length, cfg.sample_rate
    codes = fixture_codes(args.fixtures)[:, : 40 if args.quick else None]
    frames = codes.shape[1]
    latent = np.asarray(encodec.codes_to_latent(codec_params, codes[None]))[0]
    wav_codec = np.asarray(jax.jit(lambda p, x: encodec.decode_latent(cfg, p, x))(codec_params, latent[None]))[0]
    noise = row_noise(diffusion, ROW_KEY, frames * hop)
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  chunk {frames} frames "
          f"({frames * hop / rate:.2f} s)", flush=True)
    raw_whole, whole = decode_whole(diffusion, latent, wav_codec, noise, hop)

    if not (args.quick or args.skip_padded):
        from mvjax.inference.stages import diffusion_frames_bucket

        padded = diffusion_frames_bucket(frames)
        edge = lambda a, n: np.pad(a, ((0, 0), (0, n - a.shape[1])), mode="edge")
        pad_latent = np.asarray(encodec.codes_to_latent(codec_params, edge(codes, padded)[None]))[0]
        pad_codec = np.asarray(encodec.decode_latent(cfg, codec_params, pad_latent[None]))[0]
        pad_raw, _ = decode_whole(diffusion, pad_latent, pad_codec, row_noise(diffusion, ROW_KEY, padded * hop), hop)
        pad_eq = re_eq(pad_raw[:, : frames * hop], wav_codec, rate)
        print(f"stream-mbd whole_padded_to={padded} si_sdr_eq={si_sdr(pad_eq, whole):.2f} "
              f"si_sdr_none={si_sdr(pad_raw[:, : frames * hop], raw_whole):.2f}", flush=True)

    memo = MemoDiffusion(diffusion)
    for w in args.windows:
        for o in args.overlaps:
            if o > w:
                continue
            for r in args.lookaheads:
                base = WindowSettings(w, o, r)
                run = lambda **kw: decode_windowed(memo, latent, wav_codec, noise, WindowSettings(w, o, r, **kw), hop)
                results = {eq: run(eq=eq) for eq in ("running", "window", "none")}
                power = run(eq="running", fade="power")
                assert all(x.shape == whole.shape for x in (*results.values(), power))
                windows = max(1, -(-(frames - o) // w))  # each min(span, frames) frames long
                cost = (min(base.span, frames) * windows) / frames
                print(f"stream-mbd window={w} overlap={o} lookahead={r} first_audio_frames={min(base.span, frames)} "
                      f"max_delay_frames={base.max_delay} cost={cost:.2f} "
                      f"si_sdr_running={si_sdr(results['running'], whole):.2f} "
                      f"si_sdr_window={si_sdr(results['window'], whole):.2f} "
                      f"si_sdr_none={si_sdr(results['none'], raw_whole):.2f} "
                      f"si_sdr_none_then_eq={si_sdr(re_eq(results['none'], wav_codec, rate), whole):.2f} "
                      f"si_sdr_running_power={si_sdr(power, whole):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
