"""Throughput mode: per-stage batch sizes chosen from the memory a device has free.

Each stage's working memory grows linearly with its batch: the first stage's KV cache
(two rows per utterance, every layer, the whole block), the second stage's full-block
activations and logits, the decoder's activations over the waveform. :func:`plan_batch_sizes`
estimates the bytes one utterance needs in each stage from the model's own sizes and picks,
per stage, the largest power of two that fits in a fraction of the free memory (device memory
on GPU/TPU, ``MemAvailable`` on CPU), after the weights already loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import jax

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
    cache_item = 4 if tts.first_stage.cache_dtype is None else jax.numpy.dtype(tts.first_stage.cache_dtype).itemsize
    # Stage 1: conditioned + unconditioned rows, keys and values, every layer, the whole block;
    # plus per-step logits and sampling buffers (sorts over the vocabulary).
    stage1 = 2 * 2 * c1.n_layer * c1.block_size * c1.n_embd * cache_item + 2 * 8 * sum(c1.output_vocab_sizes) * 4
    # Stage 2: logits for every head at every position (x3 for scaling, top-k and sampling),
    # attention scores, and the residual stream's intermediates.
    heads = sum(c2.output_vocab_sizes)
    stage2 = (3 * heads * c2.block_size * 4 + 2 * c2.n_head * c2.block_size ** 2 * 4
              + 12 * c2.block_size * c2.n_embd * 4)
    samples = frames * tts.codec_config.hop_length
    # Codec decoder: a few activations of its widest layer over the waveform.
    codec = 6 * tts.codec_config.n_filters * 2 ** len(tts.codec_config.ratios) * frames * 4 + 8 * samples * 4
    decode = codec
    if decoder == "mbd" and "mbd" in tts.components:
        bands = tts.diffusion.bands
        widest = max(b.hidden for b in bands)
        # Each band's U-Net keeps its skips; the top levels dominate (full and 1/stride rate).
        decode += len(bands) * 40 * widest * samples * 4 + tts.diffusion.noise_count() * samples * 4
    return {"stage1": int(stage1), "stage2": int(stage2), "decoder": int(decode)}


def plan_batch_sizes(tts, frames: int, decoder: str = "mbd", available: Optional[int] = None,
                     fraction: float = 0.7, max_batch: int = MAX_BATCH) -> dict[str, int]:
    """Per-stage batch sizes (per device): the largest power of two whose estimated working memory
    fits in ``fraction`` of the free memory (``available`` bytes, measured when not given)."""
    budget = fraction * (free_bytes() if available is None else available)
    out = {}
    for stage, need in per_utterance_bytes(tts, frames, decoder).items():
        batch = 1
        while batch * 2 <= max_batch and batch * 2 * need <= budget:
            batch *= 2
        out[stage] = batch
    return out
