"""The second stage: codebooks 3-8 for every frame of a block at once, sampled per position."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mvjax.core.parallel import pad_rows, padded_size, put_batch, put_replicated
from mvjax.inference.sampling import draw_inverse_cdf, kth_largest
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt import forward_hidden, head_logits

DEFAULT_STAGE2_TOP_K = 200
# The reference's synthesis samples the second stage at temperature 1.0 whatever the first stage's.
DEFAULT_STAGE2_TEMPERATURE = 1.0


class SecondStageSampler:
    """The non-causal second stage: one forward pass over whole blocks, sampled per position.

    ``inputs`` (B, 2, block) come from :func:`mvjax.text.build_second_stage_input`; every head
    (codebooks 3..8) is sampled at every position from ``logits / T`` restricted to the top
    ``top_k`` (ties kept), or taken greedily when ``temperature == 0``. Row ``i`` draws from
    its own key, so a batch gives what each row gives alone. Over a mesh the rows are split
    across devices (parameters replicated).

    ``pad_token`` (the codebook size, 1024 as released): ids at or above it are never chosen.
    Each head also predicts the pad id; the reference keeps such a draw and its output adapter
    then drops it, which shifts that codebook against the others, so we exclude it (a trained
    model gives it almost no mass at audio positions; greedy results are unchanged wherever a
    real code wins).
    """

    def __init__(self, config: GPTConfig, params, mesh=None, pad_token: Optional[int] = None):
        if config.causal:
            raise ValueError("the second-stage sampler needs a non-causal GPT")
        self.config = config
        self.pad_token = pad_token
        self.mesh = mesh
        self.params = put_replicated(params, mesh)
        self.compile_count = 0
        self._jitted = jax.jit(self._run, static_argnames=("top_k", "width"))

    def _run(self, params, inputs, speaker_emb, keys, temperature, starts, *, top_k, width):
        self.compile_count += 1  # runs only while tracing
        x = forward_hidden(self.config, params, inputs, speaker_emb)  # (B, T, D)
        block = x.shape[1]
        if width is not None:  # only the window's positions are sampled (the costly part of a pass)
            positions = starts[:, None] + jnp.arange(width)[None]
            x = jnp.take_along_axis(x, positions[:, :, None], axis=1)
        logits = jnp.stack(head_logits(self.config, params, x), axis=1)  # (B, heads, T', V)
        if self.pad_token is not None and self.pad_token < logits.shape[-1]:
            logits = jnp.where(jnp.arange(logits.shape[-1]) >= self.pad_token, -jnp.inf, logits)
        greedy = jnp.argmax(logits, axis=-1)
        scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-5)
        if top_k is not None and top_k < scaled.shape[-1]:
            scaled = jnp.where(scaled < kth_largest(scaled, top_k), -jnp.inf, scaled)  # ties kept, as torch does
        # Each row's uniforms for the whole block (heads, T), read at the window: a position draws the
        # same number whatever window it is sampled in.
        heads = logits.shape[1]
        uniforms = jax.vmap(lambda k: jax.random.uniform(k, (heads, block, 1), jnp.float32))(keys)
        if width is not None:
            uniforms = jnp.take_along_axis(uniforms, positions[:, None, :, None], axis=2)
        drawn = draw_inverse_cdf(uniforms, scaled)
        out = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
        if width is None:
            return out
        full = jnp.full((out.shape[0], heads, block), self.pad_token or 0, jnp.int32)
        return jax.vmap(lambda f, o, p: f.at[:, p].set(o))(full, out, positions)

    def sample(self, inputs: np.ndarray, speaker_emb: Optional[np.ndarray], keys, temperature: float = 1.0,
               top_k: Optional[int] = DEFAULT_STAGE2_TOP_K, window: Optional[tuple] = None) -> np.ndarray:
        """(B, 2, block) inputs -> (B, heads, block) predicted codebooks. ``window``: ``(starts (B,), width)``:
        only positions ``starts[i] .. starts[i] + width - 1`` of row ``i`` are sampled (each as the whole
        block's pass samples it; the other positions hold the pad id); ``starts`` are moved back where
        the window would pass the block's end."""
        inputs = np.asarray(inputs, np.int32)
        batch = inputs.shape[0]
        if inputs.ndim != 3 or inputs.shape[2] != self.config.block_size:
            raise ValueError(f"second-stage input must be (batch, 2, {self.config.block_size}), got {inputs.shape}")
        keys = np.asarray(keys)
        if keys.shape[0] != batch:
            raise ValueError(f"need one PRNG key per row: got {keys.shape[0]} for {batch}")
        size = padded_size(batch, self.mesh)
        speaker_rows = None
        if speaker_emb is not None:
            speaker_rows = put_batch(pad_rows(np.asarray(speaker_emb, np.float32).reshape(batch, -1), size), self.mesh)
        top_k = None if top_k is None or top_k <= 0 else int(top_k)
        starts, width = None, None
        if window is not None and int(window[1]) < self.config.block_size:
            width = max(1, int(window[1]))
            starts = np.clip(np.asarray(window[0], np.int32).reshape(batch), 0, self.config.block_size - width)
            starts = put_batch(pad_rows(starts, size), self.mesh)
        out = self._jitted(self.params, put_batch(pad_rows(inputs, size), self.mesh), speaker_rows,
                           put_batch(pad_rows(keys, size), self.mesh), jnp.float32(temperature), starts,
                           top_k=top_k, width=width)
        return np.asarray(out)[:batch]
