"""Products with group-wise 4-bit weights (layout: :mod:`mvjax.kernels.int4_layout`, re-exported here).

:func:`int4_matmul` picks its implementation for the platform the program is lowered for, as
:func:`mvjax.kernels.int8.int8_matmul` does (see :mod:`mvjax.kernels.platform`): on CPU the C++
kernel (:func:`mvjax.kernels.cpu_int8.kernel_int4_matmul`, built with the int8 one) when it is built
and takes the group size (G = 32 or a multiple of 64), which streams the nibbles once and rounds the
activations to int8 per column and group; on CUDA GPUs and TPUs the Pallas kernel
(:mod:`mvjax.kernels.pallas_int4`) unless ``MVJAX_PALLAS=0``; elsewhere plain XLA. Every way, NaN
and inf in the activations propagate as in a float32 matmul.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mvjax.kernels import cpu_int8, pallas_int4
from mvjax.kernels.int4_layout import (  # noqa: F401 (the layout and oracle, re-exported)
    INT4_LEVELS,
    dequantize,
    group_size,
    int4_matmul_xla,
    is_int4,
    pack_codes,
    unpack_codes,
)
from mvjax.kernels.platform import float_for_nonfinite_columns, pallas_enabled


def int4_kernel_used(entry: Optional[dict] = None) -> bool:
    """Whether :func:`int4_matmul` runs the C++ kernel on the default backend (a CPU with the kernels
    built) rather than :func:`int4_matmul_xla`; with ``entry``, for that matrix (its group size must
    suit the kernel: :func:`mvjax.kernels.cpu_int8.int4_kernel_takes`). The CPU branch of the
    dispatch decides when it is traced, so a jitted function keeps the choice it was first traced with."""
    if jax.default_backend() != "cpu":
        return False
    return cpu_int8.int8_matmul_available() and (entry is None or cpu_int8.int4_kernel_takes(entry))


def int4_matmul(entry: dict, x: jnp.ndarray) -> jnp.ndarray:
    """The decoder's int4 product ``dequantize(entry) @ x`` for x (in, N) -> float32 (out, N), without a
    float32 weight copy where a kernel runs: the C++ kernel on CPU, the Pallas kernel on CUDA GPUs and
    TPUs, else XLA (module docstring)."""
    q4, scale, mins = entry["q4"], entry["scale"], entry["min"]

    def xla(q4, scale, mins, x):
        return int4_matmul_xla({"q4": q4, "scale": scale, "min": mins}, x)

    def on_cpu(q4, scale, mins, x):
        if cpu_int8.cpu_kernels_ready() and cpu_int8.int4_kernel_takes(entry):
            return float_for_nonfinite_columns(x, cpu_int8.kernel_int4_matmul(q4, scale, mins, x),
                                               lambda x: xla(q4, scale, mins, x))
        return xla(q4, scale, mins, x)

    def on(platform):
        if not pallas_enabled():
            return xla
        return lambda q4, scale, mins, x: pallas_int4.int4_matmul(q4, scale, mins, x, platform=platform)

    return jax.lax.platform_dependent(q4, scale, mins, x, cpu=on_cpu, cuda=on("cuda"), tpu=on("tpu"), default=xla)
