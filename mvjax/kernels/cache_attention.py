"""One decode step's attention over the KV cache, reading the stored float32, bf16 or int8 keys
and values directly (the C++ kernel ``cache_attention.cc``, built with :mod:`mvjax.kernels.cpu_int8`).

Why: XLA's CPU backend converts a bf16 or int8 cache to float32 before its dot (a full float
copy of the window on every step), so a compact cache read through XLA costs more than the
float32 cache it replaces (benchmarks/RESULTS.md, "Compact KV cache"); and for a float32 cache
its batched matrix-vector products read the whole window for every row. The kernel streams the
stored values once, converting in registers, and each row reads only the positions it has
reached: keys (rows, heads, head_dim, length) times the query, a vectorised softmax, then the
values, every (row, head) pair a work item on XLA's intra-op threads. Elsewhere (GPU, TPU, or
where the kernel cannot be built) :mod:`mvjax.nn.kv_cache` uses plain XLA, which accelerator
compilers fuse.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mvjax.kernels import cpu_int8


def cache_kernel_used() -> bool:
    """Whether compact-cache decode steps trace to the kernel (CPU backend, library built).
    Decided at trace time, as :func:`mvjax.kernels.int8.int8_kernel_used`."""
    return jax.default_backend() == "cpu" and cpu_int8.int8_matmul_available()


def kernel_cache_attention(q: jnp.ndarray, keys, values, positions: jnp.ndarray, window: int,
                           key_scale: Optional[jnp.ndarray] = None,
                           value_scale: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Attention of one query per row and head over the first ``window`` cache slots that each row
    may see (slot <= ``positions[r]``): q (R, H, D) float32; keys, values (R, H, D, S) float32, bf16
    (as its uint16 bit patterns), or int8
    with ``key_scale``/``value_scale`` (R, H, S) float32 (value = code * scale); -> float32 (R, H, D).
    Softmax scale 1/sqrt(D), as the float path. Call :func:`cache_kernel_used` first."""
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    q = q.astype(jnp.float32)
    positions = positions.astype(jnp.int32)
    window = min(int(window), keys.shape[-1])
    if keys.dtype == jnp.int8:
        if key_scale is None or value_scale is None:
            raise ValueError("an int8 cache needs its key and value scales")
        call = jax.ffi.ffi_call("mvjax_int8_attention", out)
        return call(q, keys, key_scale.astype(jnp.float32), values, value_scale.astype(jnp.float32), positions,
                    window=window)
    targets = {jnp.dtype(jnp.uint16): "mvjax_bf16_attention", jnp.dtype(jnp.float32): "mvjax_f32_attention"}
    if keys.dtype not in targets:
        raise ValueError(f"the cache kernel reads float32, bf16 (as uint16 bits) or int8 caches, not {keys.dtype}")
    return jax.ffi.ffi_call(targets[keys.dtype], out)(q, keys, values, positions, window=window)
