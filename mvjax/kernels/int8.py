"""Products with int8 weights (``{"q": int8 (out, in), "scale": float32 (out,)}``), whichever way runs here.

:func:`int8_matmul` picks its implementation for the platform the program is lowered for
(``jax.lax.platform_dependent``, see :mod:`mvjax.kernels.platform`): on CPU the C++ kernel
(:mod:`mvjax.kernels.cpu_int8`) when it is built, which streams the int8 weights; on CUDA GPUs
and TPUs the Pallas kernel (:mod:`mvjax.kernels.pallas_int8`), unless ``MVJAX_PALLAS=0``;
elsewhere, or where no kernel is used, plain XLA (:func:`int8_matmul_xla`). Every way, NaN and
inf in the activations propagate as in a float32 matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mvjax.kernels import cpu_int8, pallas_int8
from mvjax.kernels.platform import float_for_nonfinite_columns, pallas_enabled


def int8_kernel_used() -> bool:
    """Whether :func:`int8_matmul` runs the C++ kernel on the default backend (a CPU with the
    kernel built) rather than :func:`int8_matmul_xla`. The CPU branch of the dispatch decides
    when it is traced, so a jitted function keeps the choice it was first traced with."""
    if jax.default_backend() != "cpu":
        return False
    return cpu_int8.int8_matmul_available()


def int8_matmul_xla(q: jnp.ndarray, scale: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """The plain-XLA int8 product ``dot(q.astype(f32), x) * scale[:, None]`` -> float32 (out, N):
    what :func:`int8_matmul` runs where no kernel does (a CPU without the C++ kernel, other
    platforms, accelerators with ``MVJAX_PALLAS=0``). Float arithmetic
    throughout, so NaN/inf in ``x`` propagate as in a float32 matmul. GPU compilers fuse the
    conversion into the dot; on CPU XLA materialises the float32 copy of ``q``."""
    return jnp.dot(q.astype(jnp.float32), x.astype(jnp.float32), preferred_element_type=jnp.float32) * scale[:, None]


def int8_matmul(entry: dict, x: jnp.ndarray) -> jnp.ndarray:
    """``(q * scale[:, None]) @ x`` for x (in, N) -> float32 (out, N), without a float32 weight copy on
    CPU, GPU and TPU (the decoder's int8 product: :func:`mvjax.nn.gpt_decode._matmul`): the C++
    kernel, the Pallas kernel or XLA by the platform lowered for (module docstring)."""
    q, scale = entry["q"], entry["scale"]

    def on_cpu(q, scale, x):
        if cpu_int8.cpu_kernels_ready():
            return float_for_nonfinite_columns(x, cpu_int8.kernel_int8_matmul(q, scale, x),
                                               lambda x: int8_matmul_xla(q, scale, x))
        return int8_matmul_xla(q, scale, x)

    def on(platform):
        if not pallas_enabled():
            return int8_matmul_xla
        return lambda q, scale, x: pallas_int8.int8_matmul(q, scale, x, platform=platform)

    return jax.lax.platform_dependent(q, scale, x, cpu=on_cpu, cuda=on("cuda"), tpu=on("tpu"),
                                      default=int8_matmul_xla)

