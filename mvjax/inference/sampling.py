"""Guidance, temperature, top-k and top-p as pure functions of float32 logits.

The order and the boundary rules follow the reference's fast (gpt-fast style) path:
guided = g * cond + (1 - g) * uncond; logits / max(T, 1e-5); top-k (values below the
k-th largest removed); top-p on the scaled logits (sorted ascending, tokens whose
cumulative probability is <= 1 - p removed, the top token always kept); softmax;
sample. Temperature 0 means greedy (argmax of the guided logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def guide(cond: jnp.ndarray, uncond: jnp.ndarray, scale) -> jnp.ndarray:
    """Classifier-free guidance on float32 logits."""
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    return scale * cond + (1.0 - scale) * uncond


def top_k_filter(logits: jnp.ndarray, k) -> jnp.ndarray:
    """Keep logits >= the k-th largest (ties kept, as in the reference); k >= vocab keeps all. logits: (..., V)."""
    vocab = logits.shape[-1]
    k = jnp.clip(jnp.asarray(k), 1, vocab)
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1), jnp.broadcast_to(vocab - k, logits.shape[:-1] + (1,)), axis=-1)
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jnp.ndarray, p) -> jnp.ndarray:
    """Nucleus filter with the reference's boundary: drop tokens whose ascending cumulative probability <= 1 - p."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1.0 - p)
    remove_sorted = remove_sorted.at[..., -1].set(False)  # the most likely token always stays
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)  # back to vocab order
    return jnp.where(remove, NEG_INF, logits)


def top_k_top_p_filter(logits: jnp.ndarray, k, p) -> jnp.ndarray:
    """``top_p_filter(top_k_filter(logits, k), p)`` from one sort (the decoder's every step).

    The stable ascending order of the top-k-filtered logits is the order of ``logits`` with the
    removed entries (all -inf, probability exactly 0) first, so the sorted values, their softmax
    and cumulative sum are the same arrays the two filters compute, and so is every removal; the
    mask goes back to vocabulary order by a scatter instead of a second argsort."""
    vocab = logits.shape[-1]
    k = jnp.clip(jnp.asarray(k), 1, vocab)
    order = jnp.argsort(logits, axis=-1)  # ascending, ties by index
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(vocab - k, logits.shape[:-1] + (1,)), axis=-1)
    sorted_logits = jnp.where(sorted_logits < kth, NEG_INF, sorted_logits)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= (1.0 - p)).at[..., -1].set(False)
    flat_order = order.reshape(-1, vocab)
    rows = jnp.arange(flat_order.shape[0])[:, None]
    remove = jnp.zeros(flat_order.shape, bool).at[rows, flat_order].set(remove_sorted.reshape(-1, vocab))
    return jnp.where((logits < kth) | remove.reshape(logits.shape), NEG_INF, logits)


def filter_logits(logits: jnp.ndarray, temperature, top_k=None, top_p=None) -> jnp.ndarray:
    """Scaled and filtered logits, whose softmax is the sampling distribution."""
    logits = logits.astype(jnp.float32) / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-5)
    if top_k is not None and top_p is not None:
        return top_k_top_p_filter(logits, top_k, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample(key: jax.Array, logits: jnp.ndarray, temperature, top_k=None, top_p=None) -> jnp.ndarray:
    """One token id from (V,) logits; ``temperature == 0`` (traced or not) gives the argmax."""
    filtered = filter_logits(logits, temperature, top_k, top_p)
    drawn = jax.random.categorical(key, filtered, axis=-1)
    return jnp.where(jnp.asarray(temperature) > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def kth_largest(values: jnp.ndarray, k: int) -> jnp.ndarray:
    """The k-th largest of each row of float32 ``values`` (..., V), as (..., 1); exact.

    A radix search over the float bits (32 counting passes), which XLA:CPU runs an order of
    magnitude faster than ``lax.top_k`` or a sort over many rows. NaN is not supported.
    """
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    # Monotone map: negative floats reverse their order, then everything shifts above the positives' sign bit.
    keys = jnp.where(bits & sign, ~bits, bits | sign)

    def body(i, answer):
        candidate = answer | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        enough = jnp.sum(keys >= candidate, axis=-1, keepdims=True) >= k
        return jnp.where(enough, candidate, answer)

    answer = jax.lax.fori_loop(0, 32, body, jnp.zeros(values.shape[:-1] + (1,), jnp.uint32))
    back = jnp.where(answer & sign, answer & ~sign, ~answer)
    return jax.lax.bitcast_convert_type(back, jnp.float32)


def sample_inverse_cdf(key: jax.Array, logits: jnp.ndarray) -> jnp.ndarray:
    """One draw per row of (..., V) logits (-inf = excluded) from one uniform per row: the first
    index whose cumulative probability reaches it. Same distribution as ``categorical``, with
    V times fewer random numbers, which dominates the cost when every position of a block samples."""
    return draw_inverse_cdf(jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32), logits)


def draw_inverse_cdf(u: jnp.ndarray, logits: jnp.ndarray) -> jnp.ndarray:
    """:func:`sample_inverse_cdf` with its uniforms ``u`` (..., 1) given: a subset of rows drawn
    with the same uniforms as the whole gives the whole's draws for those rows."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    index = jnp.sum(cumulative <= u * cumulative[..., -1:], axis=-1)
    vocab = logits.shape[-1]
    last = vocab - 1 - jnp.argmax((probs > 0)[..., ::-1], axis=-1)  # never step past the last allowed id
    return jnp.minimum(index, last)
