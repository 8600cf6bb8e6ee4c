"""How close a quantised first stage samples to the float32 one: teacher-forced guided logits and
their per-position KL divergence and greedy agreement (used by benchmarks/quantize.py and tests)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mvjax.inference.sampling import guide
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt_decode import apply_tokens, init_cache


@functools.partial(jax.jit, static_argnums=0)
def _guided_logits(config: GPTConfig, params: dict, tokens, speaker_emb, guidance):
    batch, length = tokens.shape
    rows = jnp.concatenate([tokens, tokens], axis=0)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), rows.shape)
    cache = init_cache(config, 2 * batch, length)
    logits, _ = apply_tokens(config, params, rows, positions, jnp.concatenate([speaker_emb, jnp.zeros_like(speaker_emb)]), cache)
    return guide(logits[:batch], logits[batch:], guidance[:, None, None])


def guided_logits(config: GPTConfig, params: dict, tokens, speaker_emb, guidance) -> jnp.ndarray:
    """Teacher-forced next-token logits of the decoder, as sampled: ``tokens`` (B, T) run through
    :func:`mvjax.nn.gpt_decode.apply_tokens` in one pass as a conditioned and an unconditioned row
    each (``speaker_emb`` (B, S)), mixed with ``guidance`` (scalar or (B,)); float32 (B, T, V),
    position t predicting token t + 1. ``params``: a decode-layout tree (float or quantised)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    batch = tokens.shape[0]
    speaker_emb = jnp.asarray(speaker_emb, jnp.float32).reshape(batch, -1)
    guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,))
    return _guided_logits(config, params, tokens, speaker_emb, guidance)


def compare_logits(ref, other, temperature: float = 1.0) -> dict:
    """Per-position agreement of next-token distributions ``softmax(logits / temperature)``:
    ``kl`` = KL(ref || other) in nats, ``agree`` = same argmax, both (..., ) arrays."""
    ref = jnp.asarray(ref, jnp.float32) / temperature
    other = jnp.asarray(other, jnp.float32) / temperature
    logp, logq = jax.nn.log_softmax(ref, axis=-1), jax.nn.log_softmax(other, axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    agree = jnp.argmax(ref, axis=-1) == jnp.argmax(other, axis=-1)
    return {"kl": jnp.maximum(kl, 0.0), "agree": agree}
