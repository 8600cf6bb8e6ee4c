"""Throughput mode: per-stage batch sizes chosen from the memory a device has free.

Each stage's working memory grows linearly with its batch: the first stage's KV cache
(two rows per utterance, every layer, the whole block), the second stage's full-block
activations and logits, the decoder's activations over the waveform. :func:`plan_batch_sizes`
estimates the bytes one utterance needs in each stage from the model's own sizes and picks,
per stage, the largest power of two that fits in a fraction of the free memory (device memory
on GPU/TPU, ``MemAvailable`` on CPU, counted once however many CPU devices share it), after the
weights already loaded.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import jax

from mvjax.core.parallel import device_count
from mvjax.inference.options import SynthesisError
from mvjax.nn.diffusion_unet import TRANSFORMER_HEADS
from mvjax.nn.kv_cache import bytes_per_slot

MAX_BATCH = 64


def free_bytes(device: Optional[jax.Device] = None) -> int:
    """Memory still free for computation on ``device`` (host memory for CPU devices)."""
    device = device or jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices may not report
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell how much memory is free on this machine")


def per_utterance_bytes(tts, frames: int, decoder: str = "mbd") -> dict[str, int]:
    """Estimated working bytes per utterance (one chunk) in each stage."""
    c1, c2 = tts.config1, tts.config2
    # Stage 1: conditioned + unconditioned rows, keys and values, every layer, the whole block;
    # plus per-step logits and sampling buffers (sorts over the vocabulary).
    slot_bytes = bytes_per_slot(c1, tts.first_stage_decoder.kv_cache)
    stage1 = 2 * c1.block_size * slot_bytes + 2 * 8 * sum(c1.output_vocab_sizes) * 4
    # Stage 2: logits for every head at every position (x3 for scaling, top-k and sampling),
    # attention scores, and the residual stream's intermediates.
    heads = sum(c2.output_vocab_sizes)
    stage2 = (3 * heads * c2.block_size * 4 + 2 * c2.n_head * c2.block_size ** 2 * 4
              + 12 * c2.block_size * c2.n_embd * 4)
    codec_config = tts.codec.config
    samples = frames * codec_config.hop_length
    # Codec decoder: a few activations of its widest layer over the waveform.
    codec = 6 * codec_config.n_filters * 2 ** len(codec_config.ratios) * frames * 4 + 8 * samples * 4
    decode = codec
    if decoder == "mbd":
        decode += diffusion_bytes_per_row(tts.diffusion, samples, frames)
    return {"stage1": int(stage1), "stage2": int(stage2), "decoder": int(decode)}


# Live copies of a level's activation while its convolutions, norms and residual blocks run
# (input, output, normalised, two residual temporaries, the stored skip), on each side of the U-Net.
_LEVEL_COPIES = 12


def unet_bytes_per_row(cfg, samples: int, latent_frames: int) -> int:
    """Working bytes of one U-Net evaluation on one row of ``samples`` waveform samples.

    Every level's activation (channels x its length, both the encoder and the mirrored
    decoder side), plus the bottleneck: a transformer holds per layer the attention scores
    and probabilities of its 8 heads over the bottleneck length squared (and against the
    latent frames with cross-attention), its projections and its 2048-wide feed-forward. The
    attention term is quadratic in length: at 256 frames a stride-4, depth-2 U-Net has a
    5,120-step bottleneck, 0.84 GB of scores per head group per row.
    """
    total = cfg.chin * samples * 4 * 4  # input, noise, output, the sampler's running estimate
    length = samples
    for _, chout in cfg.channels():
        length = math.ceil(length / cfg.stride)
        total += _LEVEL_COPIES * chout * length * 4
    width = cfg.bottleneck
    if cfg.transformer:
        scores = 2 * TRANSFORMER_HEADS * length * length * 4
        if cfg.cross_attention:
            scores += 2 * TRANSFORMER_HEADS * length * latent_frames * 4
        total += scores + 6 * length * width * 4 + 2 * length * 2048 * 4
    elif cfg.bilstm:
        total += 12 * length * width * 4
    return int(total)


def diffusion_bytes_per_row(mbd, samples: int, latent_frames: int) -> int:
    """Working bytes per row of :meth:`MultiBandDiffusion.generate`: the largest band's U-Net (bands
    run one after another inside one program), every band's output, the noise draws and the
    per-step noise buffers the sampler stacks."""
    unet = max(unet_bytes_per_row(cfg, samples, latent_frames) for cfg in mbd.bands)
    steps = sum(len(plan.steps) for plan in mbd.plans)
    buffers = (len(mbd.bands) + mbd.noise_count() + steps) * samples * 4
    return int(unet + buffers)


def rows_that_fit(bytes_per_row: int, available: Optional[int] = None, fraction: float = 0.7) -> int:
    """How many rows of ``bytes_per_row`` fit in ``fraction`` of the free memory (at least 1)."""
    budget = fraction * (free_bytes() if available is None else available)
    return max(1, int(budget // max(1, bytes_per_row)))


def memory_pools(mesh) -> int:
    """How many separate memories the devices of ``mesh`` draw on: one each for GPUs and TPUs, one in
    all for CPU devices (forced host devices share the host's memory)."""
    if mesh is None:
        return 1
    devices = list(mesh.devices.flat)
    return 1 if all(d.platform == "cpu" for d in devices) else len(devices)


def plan_batch_sizes(tts, frames: int, decoder: str = "mbd", available: Optional[int] = None,
                     fraction: float = 0.7, max_batch: int = MAX_BATCH) -> dict[str, int]:
    """Per-stage batch sizes (per device of ``tts.mesh``): the largest power of two whose estimated
    working memory fits in ``fraction`` of the free memory (``available`` bytes, measured when not
    given) of each device, or, for CPU devices, whose total over the devices fits the one host memory."""
    available = free_bytes() if available is None else available
    devices, pools = device_count(tts.mesh), memory_pools(tts.mesh)
    out = {}
    for stage, need in per_utterance_bytes(tts, frames, decoder).items():
        fit = min(max_batch, max(1, rows_that_fit(need, available, fraction) * pools // devices))
        out[stage] = 1 << (fit.bit_length() - 1)  # the largest power of two <= fit
    return out


def resolve_batch_sizes(tts, batch_size, decoder: Optional[str], max_new_tokens: Optional[int]) -> dict[str, int]:
    """Per-stage batch sizes (per device) from an int (every stage), a dict ``{"stage1", "stage2",
    "decoder"}`` or ``"auto"`` (:func:`plan_batch_sizes` for the longest chunk ``max_new_tokens`` allows)."""
    if isinstance(batch_size, dict):
        sizes = dict(batch_size)
    elif batch_size == "auto":
        frames = tts.config2.block_size if max_new_tokens is None else max(1, max_new_tokens // 2)
        sizes = plan_batch_sizes(tts, frames=frames, decoder=decoder or "encodec")
        logging.getLogger("mvjax").info("batch sizes per device (from free memory): %s", sizes)
    elif isinstance(batch_size, int) and not isinstance(batch_size, bool):
        sizes = {"stage1": batch_size, "stage2": batch_size, "decoder": batch_size}
    else:
        raise SynthesisError(f"batch_size must be a positive integer, a per-stage dict or 'auto', not {batch_size!r}")
    if set(sizes) != {"stage1", "stage2", "decoder"} or any(not isinstance(v, int) or v < 1 for v in sizes.values()):
        raise SynthesisError(f"batch sizes must be positive integers for stage1, stage2 and decoder, got {sizes}")
    return sizes
