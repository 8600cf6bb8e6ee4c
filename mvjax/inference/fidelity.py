"""How close a quantised first stage samples to the float32 one: teacher-forced guided logits and
their per-position KL divergence and greedy agreement (used by benchmarks/quantize.py and tests)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mvjax.inference.sampling import guide
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt_decode import apply_tokens
from mvjax.nn.kv_cache import cache_kind, init_cache


@functools.partial(jax.jit, static_argnums=(0, 5))
def _guided_logits(config: GPTConfig, params: dict, tokens, speaker_emb, guidance, kv_cache: str):
    batch, length = tokens.shape
    rows = jnp.concatenate([tokens, tokens], axis=0)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), rows.shape)
    speaker_rows = jnp.concatenate([speaker_emb, jnp.zeros_like(speaker_emb)])
    cache = init_cache(config, 2 * batch, length, kv_cache)
    if kv_cache == "float32":
        logits, _ = apply_tokens(config, params, rows, positions, speaker_rows, cache)
    else:  # token by token, as decoding reads a compact cache

        def step(cache, column):
            tok, pos = column
            out, cache = apply_tokens(config, params, tok[:, None], pos[:, None], speaker_rows, cache)
            return cache, out[:, 0]

        _, logits = jax.lax.scan(step, cache, (rows.T, positions.T))
        logits = logits.swapaxes(0, 1)
    return guide(logits[:batch], logits[batch:], guidance[:, None, None])


def guided_logits(config: GPTConfig, params: dict, tokens, speaker_emb, guidance, kv_cache: str = "float32"):
    """Teacher-forced next-token logits of the decoder, as sampled: ``tokens`` (B, T) run through
    :func:`mvjax.nn.gpt_decode.apply_tokens` as a conditioned and an unconditioned row each
    (``speaker_emb`` (B, S)), mixed with ``guidance`` (scalar or (B,)); float32 (B, T, V), position
    t predicting token t + 1. ``params``: a decode-layout tree (float or quantised). ``kv_cache``:
    the cache kind (:mod:`mvjax.nn.kv_cache`); a float32 cache runs the tokens in one pass, a
    compact one token by token, so every position reads the stored cache as a decode step does."""
    tokens = jnp.asarray(tokens, jnp.int32)
    batch = tokens.shape[0]
    speaker_emb = jnp.asarray(speaker_emb, jnp.float32).reshape(batch, -1)
    guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,))
    return _guided_logits(config, params, tokens, speaker_emb, guidance, cache_kind(kv_cache))


def compare_logits(ref, other, temperature: float = 1.0) -> dict:
    """Per-position agreement of next-token distributions ``softmax(logits / temperature)``:
    ``kl`` = KL(ref || other) in nats, ``agree`` = same argmax, both (..., ) arrays."""
    ref = jnp.asarray(ref, jnp.float32) / temperature
    other = jnp.asarray(other, jnp.float32) / temperature
    logp, logq = jax.nn.log_softmax(ref, axis=-1), jax.nn.log_softmax(other, axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    agree = jnp.argmax(ref, axis=-1) == jnp.argmax(other, axis=-1)
    return {"kl": jnp.maximum(kl, 0.0), "agree": agree}
