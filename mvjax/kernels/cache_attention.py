"""One decode step's attention over the KV cache, reading the stored float32, bf16 or int8 keys
and values directly: the C++ kernel ``cache_attention.cc`` on CPU (built with
:mod:`mvjax.kernels.cpu_int8`), the Pallas kernels of :mod:`mvjax.kernels.pallas_attention` on
CUDA GPUs and TPUs, chosen by :func:`step_attention` for the platform a program is lowered for
(``jax.lax.platform_dependent``; :mod:`mvjax.kernels.platform` has the rules and the
``MVJAX_PALLAS`` switch).

Why: XLA's CPU backend converts a bf16 or int8 cache to float32 before its dot (a full float
copy of the window on every step), so a compact cache read through XLA costs more than the
float32 cache it replaces (benchmarks/RESULTS.md, "Compact KV cache"); and for a float32 cache
its batched matrix-vector products read the whole window for every row. The C++ kernel streams the
stored values once, converting in registers, and each row reads only the positions it has
reached: keys (rows, heads, head_dim, length) times the query, a vectorised softmax, then the
values, every (row, head) pair a work item on XLA's intra-op threads. The Pallas kernels do the
same per block of positions, with an online softmax. Where no kernel runs the caller's plain-XLA
attention does, which accelerator compilers fuse.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mvjax.kernels import cpu_int8, pallas_attention
from mvjax.kernels.platform import backend_platform, pallas_enabled, vary_like, varying_axes


def cache_kernel_used() -> bool:
    """Whether a decode step lowered for CPU attends through the C++ kernel (built, see
    :func:`mvjax.kernels.cpu_int8.cpu_kernels_ready`). Decided when the step is traced."""
    return cpu_int8.cpu_kernels_ready()


def pallas_attention_used(platform: str, head_dim: int, page_size: Optional[int] = None) -> bool:
    """Whether a decode step lowered for ``platform`` attends through a Pallas kernel: cuda (with
    a power-of-two head_dim and page size, as Triton wants) or tpu, unless ``MVJAX_PALLAS=0``."""
    if platform == "cuda":
        return pallas_enabled() and pallas_attention.gpu_supported(head_dim, page_size)
    return platform == "tpu" and pallas_enabled()


def ragged_kernel_on_backend(head_dim: Optional[int] = None) -> bool:
    """Whether a decode step run on JAX's default backend attends through a ragged kernel (one that
    reads, for each row, only the positions that row has reached): the C++ kernel on a CPU with it
    built, a Pallas kernel on a CUDA GPU or TPU (``head_dim`` None: assumed to suit the kernel)."""
    platform = backend_platform()
    if platform == "cpu":
        return cache_kernel_used()
    return pallas_attention_used(platform, 128 if head_dim is None else head_dim)


def kernel_cache_attention(q: jnp.ndarray, keys, values, positions: jnp.ndarray, window: int,
                           key_scale: Optional[jnp.ndarray] = None,
                           value_scale: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Attention of one query per row and head over the first ``window`` cache slots that each row
    may see (slot <= ``positions[r]``): q (R, H, D) float32; keys, values (R, H, D, S) float32, bf16
    (as its uint16 bit patterns), or int8
    with ``key_scale``/``value_scale`` (R, H, S) float32 (value = code * scale); -> float32 (R, H, D).
    Softmax scale 1/sqrt(D), as the float path. The C++ kernel: call :func:`cache_kernel_used` first."""
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    varying = varying_axes(q, keys, values, positions, key_scale, value_scale)  # inside shard_map, the result's
    q = q.astype(jnp.float32)
    positions = positions.astype(jnp.int32)
    window = min(int(window), keys.shape[-1])
    if keys.dtype == jnp.int8:
        if key_scale is None or value_scale is None:
            raise ValueError("an int8 cache needs its key and value scales")
        call = jax.ffi.ffi_call("mvjax_int8_attention", out)
        return vary_like(call(q, keys, key_scale.astype(jnp.float32), values, value_scale.astype(jnp.float32),
                              positions, window=window), varying)
    targets = {jnp.dtype(jnp.uint16): "mvjax_bf16_attention", jnp.dtype(jnp.float32): "mvjax_f32_attention"}
    if keys.dtype not in targets:
        raise ValueError(f"the cache kernel reads float32, bf16 (as uint16 bits) or int8 caches, not {keys.dtype}")
    return vary_like(jax.ffi.ffi_call(targets[keys.dtype], out)(q, keys, values, positions, window=window), varying)


def step_attention(q: jnp.ndarray, keys, values, positions: jnp.ndarray, window: int,
                   key_scale: Optional[jnp.ndarray] = None, value_scale: Optional[jnp.ndarray] = None, *,
                   xla: Callable) -> jnp.ndarray:
    """:func:`kernel_cache_attention`'s contract through the kernel of the platform lowered for:
    cpu: the C++ kernel when built; cuda, tpu: the Pallas ragged kernel
    (:func:`pallas_attention_used`); otherwise ``xla(q, keys, values, positions, key_scale,
    value_scale)``, the caller's plain-XLA attention with the same arguments and result. Which
    branch a CPU lowering takes is decided when the step is traced (as before the dispatch)."""
    head_dim = q.shape[-1]

    def on_cpu(*args):
        return kernel_cache_attention(*args[:4], window, *args[4:]) if cache_kernel_used() else xla(*args)

    def on(platform):
        if not pallas_attention_used(platform, head_dim):
            return xla
        return lambda *args: pallas_attention.ragged_attention(*args[:4], window, *args[4:], platform=platform)

    return jax.lax.platform_dependent(q.astype(jnp.float32), keys, values, positions.astype(jnp.int32), key_scale,
                                      value_scale, cpu=on_cpu, cuda=on("cuda"), tpu=on("tpu"), default=xla)


def paged_step_attention(q: jnp.ndarray, key_pages, value_pages, table: jnp.ndarray, positions: jnp.ndarray,
                         key_scale: Optional[jnp.ndarray] = None,
                         value_scale: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """A decode step's attention over a paged cache (:func:`mvjax.kernels.pallas_attention.paged_attention`'s
    contract) through the Pallas kernel on cuda and tpu (:func:`pallas_attention_used`), else the
    plain-XLA gather-then-attend (:func:`mvjax.kernels.pallas_attention.paged_attention_xla`)."""
    head_dim, page = key_pages.shape[2], key_pages.shape[3]

    def on(platform):
        if not pallas_attention_used(platform, head_dim, page):
            return pallas_attention.paged_attention_xla
        return lambda *args: pallas_attention.paged_attention(*args, platform=platform)

    return jax.lax.platform_dependent(q.astype(jnp.float32), key_pages, value_pages, table.astype(jnp.int32),
                                      positions.astype(jnp.int32), key_scale, value_scale, cuda=on("cuda"),
                                      tpu=on("tpu"), default=pallas_attention.paged_attention_xla)
