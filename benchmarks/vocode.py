"""Tokens-to-audio speed: real-time factor of each decoder and of the post-processing.

    python -m benchmarks.vocode [--seconds 2] [--unet realistic|tiny] [--steps 20]

Random weights in the released shapes: the 24 kHz EnCodec (SEANet, 32 codebooks, 8 used)
and four diffusion U-Nets of audiocraft's default score-model size (hidden 48, depth 4,
growth 4, kernel 8, stride 4, bottleneck transformer; ``--unet tiny`` uses the fixture's
size instead). RTF = processing seconds / audio seconds (below 1 is faster than real time);
compile time is reported apart. Ends with one line per stage:
  vocode stage=<name> seconds_audio=<s> rtf=<x>
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_of
from mvjax.inference.diffusion import MultiBandDiffusion, re_eq  # noqa: E402
from mvjax.nn import encodec  # noqa: E402
from mvjax.nn.diffusion_unet import UnetConfig  # noqa: E402
from mvjax.nn.diffusion_unet import abstract_params as unet_shapes

SCHEDULE = {"repartition": "power", "beta_t0": 1e-5, "beta_t1": 0.029, "beta_exp": 7.5, "num_steps": 1000,
            "variance": "beta", "clip": 5.0, "rescale": 1.0, "noise_scale": 1.0}


def random_tree(abstract, seed: int, scale: float = 0.05):
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    key = jax.random.PRNGKey(seed)
    out = [scale * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32) for i, leaf in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def unet_config(kind: str) -> UnetConfig:
    if kind == "tiny":
        return UnetConfig(hidden=8, depth=2, growth=2, kernel=8, stride=4, transformer=True, codec_dim=128,
                          emb_all_layers=True)
    return UnetConfig(hidden=48, depth=4, growth=4, kernel=8, stride=4, transformer=True, codec_dim=128,
                      emb_all_layers=True)


def mbd_model(kind: str, sample_rate: int = 24000):
    """(DiffusionConfig, params) of a four-band diffusion decoder with random weights, converted layout."""
    from mvjax.nn.diffusion_config import DiffusionConfig

    ucfg = unet_config(kind)
    config = DiffusionConfig.from_dict({"sample_rate": sample_rate, "n_bands": 4, "bands": [
        {"unet": dataclasses.asdict(ucfg), "schedule": SCHEDULE, "processor": {"use": False}} for _ in range(4)]})
    params = {f"band_{b}": random_tree(unet_shapes(ucfg), 10 + b, 0.02) for b in range(4)}
    return config, params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="audio length")
    parser.add_argument("--unet", choices=["realistic", "tiny"], default="realistic")
    parser.add_argument("--no-enhance", action="store_true")
    args = parser.parse_args(argv)

    cfg = encodec.EncodecConfig()
    frames = int(round(args.seconds * cfg.frame_rate))
    seconds = frames * cfg.hop_length / cfg.sample_rate
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  audio {seconds:.2f} s ({frames} frames)")
    codec_params = random_tree(encodec.abstract_params(cfg), 0)
    codes = jax.random.randint(jax.random.PRNGKey(1), (1, 8, frames), 0, cfg.bins)
    decode = jax.jit(lambda p, c: encodec.decode_codes(cfg, p, c))
    first = time.perf_counter()
    jax.block_until_ready(decode(codec_params, codes))
    compile_s = time.perf_counter() - first
    codec_s, wav_codec = best_of(lambda: decode(codec_params, codes), 2)
    compile_s -= codec_s
    lines = [("encodec", codec_s, compile_s)]

    model = MultiBandDiffusion(*mbd_model(args.unet, cfg.sample_rate))
    latent = np.asarray(encodec.codes_to_latent(codec_params, codes))
    wav_codec = np.asarray(wav_codec)
    first = time.perf_counter()
    model.generate(latent, wav_codec.shape, key=jax.random.PRNGKey(0))
    total_first = time.perf_counter() - first
    mbd_s, diffused = best_of(lambda: model.generate(latent, wav_codec.shape, key=jax.random.PRNGKey(1)))
    lines.append((f"mbd-{args.unet}", mbd_s, max(total_first - mbd_s, 0.0)))
    eq_s, _ = best_of(lambda: re_eq(diffused, wav_codec, cfg.sample_rate))
    lines.append(("re-eq", eq_s, 0.0))

    from mvjax.audio.loudness import normalize_loudness

    loud_s, loud = best_of(lambda: normalize_loudness(wav_codec[0], cfg.sample_rate))
    lines.append(("loudness", loud_s, 0.0))
    if not args.no_enhance:
        from mvjax.audio.enhance import enhance

        enh_s, _ = best_of(lambda: enhance(loud[0], cfg.sample_rate))
        lines.append(("deepfilternet3", enh_s, 0.0))

    for name, s, c in lines:
        print(f"  {name}: {s:.3f} s for {seconds:.2f} s of audio (compile {c:.1f} s)")
    for name, s, _ in lines:
        print(f"vocode stage={name} seconds_audio={seconds:.2f} rtf={s / seconds:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
