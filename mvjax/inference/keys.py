"""Randomness: which PRNG key every draw of a synthesis uses.

One key per utterance from the seed and the utterance's index (its line in a batch file), a
key per chunk folded from it with the chunk's position (and each half of a re-split chunk
folded again), and per stage a constant folded in last. So a text gets the same audio
whatever else is in the batch, however it is packed, and on any number of devices.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

STAGE1, STAGE2, DIFFUSION = 1, 2, 3


def utterance_keys(seed: int, count: int) -> jax.Array:
    """One PRNG key per utterance 0..count-1, derived from a seed and the utterance index."""
    base = jax.random.PRNGKey(seed)
    return jnp.stack([jax.random.fold_in(base, i) for i in range(count)])


def keys_for(seed: int, ids: Sequence[int]) -> np.ndarray:
    """The keys of utterances ``ids`` (any subset of a larger list), (len(ids), 2) uint32."""
    ids = list(ids)
    return np.asarray(utterance_keys(seed, max(ids) + 1))[ids]


def fold(key, number: int) -> np.ndarray:
    """A key derived from ``key`` and ``number`` (a chunk's position, a re-split half, a stage)."""
    return np.asarray(jax.random.fold_in(key, number))
