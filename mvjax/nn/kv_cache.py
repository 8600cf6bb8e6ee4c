"""The first stage's KV cache: float32, bf16, or int8 with a scale per row, head and position.

A cache is a list with one ``(keys, values)`` pair per layer. Each of the two is an array
(rows, heads, head_dim, length), positions last (see :mod:`mvjax.nn.gpt_decode` for why): float32,
or for bf16 the values' bit patterns as uint16 (XLA's CPU backend widens bf16 updates and slices
to float32, which turned every step's cache write into a float copy of the whole cache); or for
int8 a dict ``{"q": int8 (rows, heads, head_dim, length), "scale": float32 (rows, heads, length)}``:
each head's key (or value) vector at a position is stored as ``round(x / s)`` with
``s = max|x| / 127`` over its ``head_dim`` entries, so the largest entry keeps full int8 range
and the rounding error is at most ``s / 2``. Every leaf has rows first and positions last, so
slicing rows or positions is the same ``tree_map`` whatever the kind.

Reads: a decode step (one float32 query per row) runs a cache kernel whatever the kind
(:mod:`mvjax.kernels.cache_attention`: the C++ kernel on CPU, the Pallas kernels on CUDA GPUs and
TPUs): it reads the stored bytes, and only the positions each row has reached, in one call for all
rows and heads. Prefill, bf16 compute and other platforms use XLA (dequantising a compact cache
first; accelerator compilers fuse that into the product).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from mvjax.kernels.cache_attention import ragged_kernel_on_backend, step_attention
from mvjax.nn.config import GPTConfig

KV_CACHE_KINDS = ("float32", "bf16", "int8")
_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bf16": "bf16", "bfloat16": "bf16",
            "int8": "int8"}
INT8_MAX = 127


def cache_kind(kind: Union[str, jnp.dtype, type, None], default: str = "float32") -> str:
    """A cache kind from its name or a dtype (float32, bfloat16); ``None`` gives ``default``."""
    if kind is None:
        return default
    if isinstance(kind, str):
        name = kind.strip().lower()
    else:
        name = jnp.dtype(kind).name
    if name not in _ALIASES:
        raise ValueError(f"unknown KV cache kind {kind!r}: choose one of {', '.join(KV_CACHE_KINDS)}")
    return _ALIASES[name]


def bytes_per_slot(config: GPTConfig, kind: str) -> int:
    """Bytes one row's keys and values take per position, over every layer (scales included)."""
    kind = cache_kind(kind)
    per_vector = {"float32": 4 * config.head_dim, "bf16": 2 * config.head_dim, "int8": config.head_dim + 4}[kind]
    return 2 * config.n_layer * config.n_head * per_vector


def init_cache(config: GPTConfig, rows: int, length: int, kind="float32") -> list:
    """Per layer (keys, values) for ``rows`` rows and ``length`` positions, zero-filled (see the
    module docstring for the layouts). ``kind``: a name of :data:`KV_CACHE_KINDS` or a float dtype."""
    kind = cache_kind(kind)
    shape = (rows, config.n_head, config.head_dim, length)

    def one():
        if kind == "int8":
            return {"q": jnp.zeros(shape, jnp.int8), "scale": jnp.zeros(shape[:2] + shape[3:], jnp.float32)}
        return jnp.zeros(shape, jnp.uint16 if kind == "bf16" else jnp.float32)

    return [(one(), one()) for _ in range(config.n_layer)]


def kind_of(cache: list) -> str:
    """The kind of an existing cache."""
    keys = cache[0][0]
    if isinstance(keys, dict):
        return "int8"
    return "bf16" if keys.dtype == jnp.uint16 else cache_kind(keys.dtype)


def _to_bits(x: jnp.ndarray) -> jnp.ndarray:
    """float -> the uint16 bit patterns of its bf16 rounding (how a bf16 cache stores values)."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)


def _from_bits(bits: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(jnp.float32)


def length(cache: list) -> int:
    """Positions a cache holds."""
    keys = cache[0][0]
    return (keys["q"] if isinstance(keys, dict) else keys).shape[-1]


def quantize(x: jnp.ndarray) -> dict:
    """x (..., head_dim, T) float -> int8 codes and float32 scales (..., T), one per vector."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-2)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None, :]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return {"q": q, "scale": scale}


def dequantize(entry, length: int) -> jnp.ndarray:
    """The first ``length`` positions of a cache entry (array or int8 dict) as float32."""
    if isinstance(entry, dict):
        return entry["q"][..., :length].astype(jnp.float32) * entry["scale"][..., None, :length]
    if entry.dtype == jnp.uint16:
        return _from_bits(entry[..., :length])
    return entry[..., :length].astype(jnp.float32)


def write(entry, update: jnp.ndarray, positions: jnp.ndarray):
    """``entry`` with ``update`` (R, H, D, T) stored at each row's positions: ``positions`` (R, T);
    with T == 1 every row writes at its own position, with T > 1 all rows start at ``positions[0, 0]``."""
    if isinstance(entry, dict):
        new = quantize(update)
        return {name: write(entry[name], new[name], positions) for name in ("q", "scale")}
    update = _to_bits(update) if entry.dtype == jnp.uint16 else update.astype(entry.dtype)
    if update.shape[-1] == 1:
        put = jax.vmap(lambda c, u, p: jax.lax.dynamic_update_slice(c, u, (0,) * (c.ndim - 1) + (p,)))
        return put(entry, update, positions[:, 0])
    return jax.lax.dynamic_update_slice(entry, update, (0,) * (entry.ndim - 1) + (positions[0, 0],))


def step_kernel_used(dtype, head_dim: Optional[int] = None) -> bool:
    """Whether one-token decode steps with ``dtype`` activations, run on JAX's default backend,
    attend through a ragged kernel (:func:`attend`): the C++ cache kernel on a CPU with it built,
    a Pallas kernel on a CUDA GPU or TPU (``head_dim``: the model's, which the GPU kernel needs a
    power of two; None: assumed to fit). Such a kernel reads, for each row, only the positions
    that row has reached, so the length of the cache passed in costs nothing. Decided at trace time."""
    return jnp.dtype(dtype) == jnp.float32 and ragged_kernel_on_backend(head_dim)


def attend(q: jnp.ndarray, keys, values, positions: jnp.ndarray, length: int, dtype,
           kernel: bool = True) -> jnp.ndarray:
    """Causal attention of q (R, H, T, D) over the first ``length`` cache positions (each query sees
    slots <= its position) -> (R, H, T, D) in ``dtype``. A float32 one-token step (``kernel``)
    goes through :func:`mvjax.kernels.cache_attention.step_attention`, which picks the C++ kernel
    (CPU), a Pallas kernel (GPU, TPU) or this function's XLA path for the platform lowered for.
    ``kernel=False``: XLA even for one-token queries (a prefill piece of one token, computed as
    the whole prefill computes it)."""
    if kernel and q.shape[2] == 1 and jnp.dtype(q.dtype) == jnp.float32:
        scales = (None, None)
        if isinstance(keys, dict):
            scales = (keys["scale"], values["scale"])
            keys, values = keys["q"], values["q"]

        def xla(q, keys, values, positions, key_scale, value_scale):
            if key_scale is not None:
                keys, values = {"q": keys, "scale": key_scale}, {"q": values, "scale": value_scale}
            return _attend_xla(q[:, :, None], keys, values, positions[:, None], length, dtype)[:, :, 0]

        y = step_attention(q[:, :, 0], keys, values, positions[:, 0], length, *scales, xla=xla)
        return y[:, :, None].astype(dtype)
    return _attend_xla(q, keys, values, positions, length, dtype)


def _attend_xla(q: jnp.ndarray, keys, values, positions: jnp.ndarray, length: int, dtype) -> jnp.ndarray:
    """:func:`attend` in plain XLA: dequantise the first ``length`` slots, masked softmax, product."""
    k, v = dequantize(keys, length).astype(q.dtype), dequantize(values, length).astype(q.dtype)
    mask = (jnp.arange(length)[None, None, :] <= positions[:, :, None])[:, None]  # (R, 1, T, S)
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    scores = jnp.einsum("rhtd,rhds->rhts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("rhts,rhds->rhtd", probs.astype(dtype), v.astype(dtype))


def write_rows(entry, update: jnp.ndarray, rows, start):
    """``entry`` with ``update`` (2, H, D, T) stored in cache rows ``rows`` (two traced indices), positions
    ``start .. start + T - 1`` (one slice update per row; the rest of the cache is left in place)."""
    if isinstance(entry, dict):
        new = quantize(update)
        return {name: write_rows(entry[name], new[name], rows, start) for name in ("q", "scale")}
    update = _to_bits(update) if entry.dtype == jnp.uint16 else update.astype(entry.dtype)
    for i, row in enumerate(rows):
        at = (row,) + (0,) * (entry.ndim - 2) + (start,)
        entry = jax.lax.dynamic_update_slice(entry, update[i:i + 1], at)
    return entry


def read_rows(entry, rows, length: int):
    """Cache rows ``rows`` (two traced indices), first ``length`` positions, stacked, in the stored kind."""
    if isinstance(entry, dict):
        return {name: read_rows(entry[name], rows, length) for name in ("q", "scale")}
    size = (1,) + entry.shape[1:-1] + (length,)
    return jnp.concatenate([jax.lax.dynamic_slice(entry, (row,) + (0,) * (entry.ndim - 1), size) for row in rows])


def window_part(cache: list, window: int) -> list:
    """The first ``window`` positions of every layer's keys and values, as a copy."""
    return jax.tree_util.tree_map(lambda a: a[..., :window], cache)


def put_window_part(cache: list, part: list) -> list:
    """``cache`` with its first positions replaced by ``part`` (see :func:`window_part`)."""
    return jax.tree_util.tree_map(lambda big, small: jax.lax.dynamic_update_slice(big, small, (0,) * big.ndim),
                                  cache, part)


def take_rows(cache: list, start, count: int) -> list:
    """Rows ``start .. start + count - 1`` of every leaf (``start`` may be traced)."""
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, count, axis=0), cache)


def put_rows(cache: list, part: list, start) -> list:
    """``cache`` with rows from ``start`` on replaced by ``part`` (same kind, fewer rows)."""
    return jax.tree_util.tree_map(
        lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), start, axis=0),
        cache, part)
