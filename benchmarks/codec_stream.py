"""EnCodec incremental decoding against the whole decode: the cost of one streamed piece.

    python -m benchmarks.codec_stream [--frames 150] [--pieces 1 4 8 16 32] [--batch 1] [--codec DIR]

The 24 kHz codec in its released shape with random weights (``--codec``: a converted model
directory instead, e.g. the fixture codec). For each piece size, a stream over ``--frames``
frames runs through :class:`mvjax.nn.encodec.StreamingDecoder`; the steady piece time is the
median of its calls after the first run (and their fastest, steadier on a busy machine). RTF = seconds / audio seconds. One line each:
  codec-stream whole frames=<n> ms=<t> rtf=<x> compile_s=<c>
  codec-stream piece_frames=<n> first_ms=<t> step_ms=<t> step_min_ms=<t> ms_per_frame=<t> rtf=<x> stream_ms=<t> compile_s=<c>
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks.common import best_of, clock
from benchmarks.vocode import random_tree
from mvjax.core.precision import apply as apply_precision
from mvjax.io.checkpoint import load_encodec
from mvjax.nn import encodec


def stream_once(cfg, params, latent, piece):
    """(seconds of each push in order, the concatenated audio) of one stream fed ``piece`` frames per push."""
    dec = encodec.StreamingDecoder(cfg, params, latent.shape[0], piece_frames=piece)
    times, outs, frames = [], [], latent.shape[-1]
    for start in range(0, frames, piece):
        last = start + piece >= frames
        seconds, out = clock(lambda: dec.push(latent[..., start : start + piece], last=last))
        times.append(seconds)
        outs.append(out)
    return times, np.concatenate([np.asarray(o) for o in outs], axis=-1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--pieces", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--codec", help="a converted model directory (default: random weights, released shape)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    apply_precision()

    if args.codec:
        cfg, params = load_encodec(args.codec, verify=True)
    else:
        cfg = encodec.EncodecConfig()
        params = random_tree(encodec.abstract_params(cfg), 0)
    hop, sr = cfg.hop_length, cfg.sample_rate
    codes = np.random.default_rng(0).integers(0, cfg.bins, (args.batch, 8, args.frames))
    latent = jax.block_until_ready(encodec.codes_to_latent(params, codes))
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  batch {args.batch}  "
          f"frames {args.frames} ({args.frames * hop / sr:.2f} s)  warm-up {encodec.stream_warmup_frames(cfg)} frames")

    whole_fn = jax.jit(encodec.decode_latent, static_argnums=0)
    first, _ = clock(lambda: whole_fn(cfg, params, latent))
    whole_s, whole = best_of(lambda: whole_fn(cfg, params, latent), args.repeats)
    whole = np.asarray(whole)
    print(f"codec-stream whole frames={args.frames} ms={whole_s * 1e3:.1f} rtf={whole_s / (args.frames * hop / sr):.4f} "
          f"compile_s={first - whole_s:.2f}")

    for piece in args.pieces:
        start = time.perf_counter()
        times, wav = stream_once(cfg, params, latent, piece)  # compiles
        compile_s = time.perf_counter() - start
        runs = [stream_once(cfg, params, latent, piece) for _ in range(args.repeats)]
        diff = max(float(np.abs(w - whole).max()) for _, w in runs)
        best = min(runs, key=lambda r: sum(r[0]))[0]
        compile_s -= sum(best)
        # The first push that runs the network (the warm-up run), then the steady pushes (full pieces only).
        warm = -(-encodec.stream_warmup_frames(cfg) // piece) - 1
        steady = best[warm + 1 : -1] or best[warm + 1 :]
        step = statistics.median(steady) if steady else float("nan")
        print(f"codec-stream piece_frames={piece} first_ms={best[warm] * 1e3:.1f} step_ms={step * 1e3:.2f} "
              f"step_min_ms={min(steady) * 1e3:.2f} "
              f"ms_per_frame={step / piece * 1e3:.2f} rtf={step / (piece * hop / sr):.4f} "
              f"stream_ms={sum(best) * 1e3:.1f} compile_s={compile_s:.2f} max_abs_diff={diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
