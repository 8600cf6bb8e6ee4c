"""python -m mvjax.vocode --model CONVERTED --tokens FILE.npz --out OUT.wav

EnCodec codes (``all_codebooks``: (8, frames) or (batch, 8, frames)) to a 24 kHz waveform,
through multi-band diffusion (default) or the plain codec decoder (``--decoder encodec``,
fast). As the reference writes its outputs, the waveform is then normalised to -14 LUFS
with tanh soft clipping and cleaned by DeepFilterNet3 at 48 kHz (``--no-enhance`` keeps
24 kHz and skips it). ``--noises FILE.npy --raw`` replays a reference run: the diffusion
draws come from the file (reference call order) and the diffusion + re-EQ output is written
as is (float32, 24 kHz, no loudness normalisation or enhancement).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mvjax.audio.enhance import DeepFilterNet3
from mvjax.audio.io import output_format, write_wav
from mvjax.cli.common import exit_now, guarded
from mvjax.cli.common import fail as _fail
from mvjax.core.precision import PrecisionError
from mvjax.core.precision import apply as apply_precision


def main(argv: list[str] | None = None) -> int:
    return guarded(lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvjax.vocode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="converted model directory (with encodec, and mbd for --decoder mbd)")
    parser.add_argument("--tokens", required=True, help=".npz with all_codebooks (8, frames) or (batch, 8, frames)")
    parser.add_argument("--out", required=True, help="output WAV (batch inputs write OUT with _0, _1, ... suffixes)")
    parser.add_argument("--decoder", choices=["mbd", "encodec"], default="mbd")
    parser.add_argument("--seed", type=int, default=0, help="seed of the diffusion noise")
    parser.add_argument("--noises", help=".npy of diffusion noises in the reference's call order (replays a reference run)")
    parser.add_argument("--raw", action="store_true", help="write the decoder output as is (float32, no loudness/enhancement)")
    parser.add_argument("--no-enhance", action="store_true", help="skip DeepFilterNet3 enhancement")
    parser.add_argument("--matmul-precision", choices=["highest", "high", "default"],
                        help="float32 matmul precision (default: $MVJAX_MATMUL_PRECISION or 'highest'; see mvjax.core.precision)")
    args = parser.parse_args(argv)
    try:
        apply_precision(args.matmul_precision)
    except PrecisionError as exc:
        return _fail(str(exc))

    out = Path(args.out)
    if not out.parent.is_dir():
        return _fail(f"output directory {out.parent} does not exist")
    output_format(out)  # an extension we cannot write: refused before any work
    if out.resolve() == Path(args.tokens).resolve():
        return _fail(f"output {out} is the tokens file; refusing to overwrite it")
    try:
        data = np.load(args.tokens, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return _fail(f"cannot read {args.tokens}: {exc}")
    if not isinstance(data, np.lib.npyio.NpzFile):
        return _fail(f"{args.tokens} is a single array; give the .npz that --save-tokens writes (with all_codebooks)")
    try:
        with data:
            if "all_codebooks" not in data:
                return _fail(f"{args.tokens} has no 'all_codebooks' array (found: {', '.join(data.files) or 'nothing'})")
            codes = np.asarray(data["all_codebooks"])
    except (OSError, ValueError, EOFError) as exc:
        return _fail(f"cannot read {args.tokens}: {exc}")
    if codes.ndim == 2:
        codes = codes[None]
    if codes.ndim != 3 or codes.shape[-1] == 0 or not np.issubdtype(codes.dtype, np.integer):
        return _fail(f"all_codebooks must be integer codes of shape (n_q, frames) or (batch, n_q, frames), got {codes.shape}")

    # heavy (the model stack): loaded only once the flags and the tokens file are checked
    import jax

    from mvjax.audio.finish import finish_audio
    from mvjax.inference.diffusion import MultiBandDiffusion
    from mvjax.inference.stages import Codec
    from mvjax.io.checkpoint import load_encodec, load_mbd

    cfg, params = load_encodec(args.model)  # a missing or damaged model: a one-line MvjaxError
    if codes.shape[1] > cfg.n_q or codes.min() < 0 or codes.max() >= cfg.bins:
        return _fail(f"codes must use at most {cfg.n_q} codebooks with ids in [0, {cfg.bins}); got {codes.shape[1]} "
                     f"codebooks, ids {codes.min()}..{codes.max()}")
    latent, wav_codec = Codec(cfg, params).decode(codes)
    wav = wav_codec
    if args.decoder == "mbd":
        model = MultiBandDiffusion(*load_mbd(args.model))
        noises = None
        if args.noises:
            try:
                noises = np.load(args.noises)
            except (OSError, ValueError) as exc:
                return _fail(f"cannot read {args.noises}: {exc}")
            expected = model.noise_count() * int(np.prod(wav_codec.shape))
            if noises.size != expected:
                return _fail(f"{args.noises} holds {noises.size} values; this model and input need "
                             f"{model.noise_count()} draws of shape {wav_codec.shape}")
        wav = model.tokens_to_wav(latent, wav_codec, noises=noises, key=jax.random.PRNGKey(args.seed))

    rate = cfg.sample_rate
    results = [np.asarray(w) for w in wav]  # each (channels, samples)
    if not args.raw:
        enhancer = None
        if not args.no_enhance:
            enhancer = DeepFilterNet3()
        try:
            finished = [finish_audio(w, cfg.sample_rate, True, enhancer) for w in results]
        finally:
            if enhancer is not None:
                enhancer.close()
        results, rate = [w for w, _ in finished], finished[0][1]
    outputs = [out] if len(results) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(results))]
    for path, audio in zip(outputs, results):
        write_wav(path, audio, rate, subtype="FLOAT" if args.raw else "PCM_16")
        print(f"wrote {path} ({audio.shape[-1] / rate:.2f} s at {rate} Hz)")
    return 0


if __name__ == "__main__":
    exit_now(main())
