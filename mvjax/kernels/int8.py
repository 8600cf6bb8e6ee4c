"""Products with int8 weights (``{"q": int8 (out, in), "scale": float32 (out,)}``), whichever way runs here.

On the CPU backend with the kernel built (:mod:`mvjax.kernels.cpu_int8`) the product streams
int8 weights; elsewhere it is plain XLA (:func:`int8_matmul_xla`), which GPU compilers fuse.
Either way NaN and inf in the activations propagate as in a float32 matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mvjax.kernels import cpu_int8


def int8_kernel_used() -> bool:
    """Whether :func:`int8_matmul` traces to the CPU kernel (:mod:`mvjax.kernels.cpu_int8`) rather
    than :func:`int8_matmul_xla`: on the CPU backend when the kernel is built. Decided at trace
    time, so a jitted function keeps the choice it was first traced with."""
    if jax.default_backend() != "cpu":
        return False
    return cpu_int8.int8_matmul_available()


def int8_matmul_xla(q: jnp.ndarray, scale: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """The plain-XLA int8 product ``dot(q.astype(f32), x) * scale[:, None]`` -> float32 (out, N):
    what :func:`int8_matmul` runs off CPU or where the kernel cannot be built. Float arithmetic
    throughout, so NaN/inf in ``x`` propagate as in a float32 matmul. GPU compilers fuse the
    conversion into the dot; on CPU XLA materialises the float32 copy of ``q``."""
    return jnp.dot(q.astype(jnp.float32), x.astype(jnp.float32), preferred_element_type=jnp.float32) * scale[:, None]


def int8_matmul(entry: dict, x: jnp.ndarray) -> jnp.ndarray:
    """``(q * scale[:, None]) @ x`` for x (in, N) -> float32 (out, N), without a float32 weight copy on CPU
    (the decoder's int8 product: :func:`mvjax.nn.gpt_decode._matmul`)."""
    q, scale = entry["q"], entry["scale"]
    if int8_kernel_used():
        return _float_for_nonfinite_columns(q, scale, x, cpu_int8.kernel_int8_matmul(q, scale, x))
    return int8_matmul_xla(q, scale, x)


def _float_for_nonfinite_columns(q: jnp.ndarray, scale: jnp.ndarray, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """``y`` with every column whose activations hold NaN or inf replaced by the float32 product.

    Integer codes cannot carry NaN/inf: such a column would come out as finite garbage (NaN:
    the scale falls back to 1.0) or NaN everywhere (inf: the scale is inf). A float matmul
    gives NaN for a NaN column and, for an inf column, +-inf or NaN row by row (signs of the
    weights met, ``0 * inf``), never a finite value. The exact float result costs a float32
    copy of ``q`` (what the kernel avoids), so it runs under ``lax.cond`` only when some column
    is non-finite; the usual step pays one ``isfinite`` pass over ``x`` (K x N, tiny next to
    the O x K weights) and the branch. (Under ``vmap`` with a batched predicate ``cond`` becomes
    a select that runs both branches; the decoder batches along N instead.)"""
    bad = jnp.any(~jnp.isfinite(x), axis=0)

    def patch(y):
        exact = int8_matmul_xla(q, scale, jnp.where(bad[None, :], x, jnp.zeros((), x.dtype)))
        return jnp.where(bad[None, :], exact, y)

    return jax.lax.cond(jnp.any(bad), patch, lambda y: y, y)
