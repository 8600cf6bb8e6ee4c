"""Which kernels run where: the switches and names shared by the kernel dispatch.

The decoder's int8 products (:func:`mvjax.kernels.int8.int8_matmul`) and a decode step's attention
(:func:`mvjax.kernels.cache_attention.step_attention`) choose their implementation with
``jax.lax.platform_dependent``, so the choice is made for the platform a program is *lowered*
for, not the one the tracing process happens to run on:

* ``cpu``: the C++ kernels (:mod:`mvjax.kernels.cpu_int8`) when they are built, else plain XLA;
* ``cuda`` and ``tpu``: the Pallas kernels (:mod:`mvjax.kernels.pallas_int8`,
  :mod:`mvjax.kernels.pallas_attention`: Triton on CUDA GPUs, Mosaic on TPUs), or plain XLA
  where a kernel does not take the shapes;
* anything else (ROCm, ...): plain XLA.

``MVJAX_PALLAS=0`` (or ``false``/``no``/``off``) in the environment forces plain XLA on
accelerators (read when a program is traced); ``MVJAX_CPU_KERNELS=0`` does the same for the C++
kernels on CPU.

:func:`pallas_names` lists the Pallas kernels a lowered program calls (each ``pallas_call`` has a
stable name), for lowering reports and tests.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import jax
import jax.numpy as jnp

# Names given to the pallas_calls (the kernels' ``name=``), found again by :func:`pallas_names`.
INT8_MATMUL = "mvjax_int8_matmul"
INT4_MATMUL = "mvjax_int4_matmul"
RAGGED_ATTENTION = "mvjax_ragged_attention"
PAGED_ATTENTION = "mvjax_paged_attention"
PALLAS_KERNELS = (INT8_MATMUL, INT4_MATMUL, RAGGED_ATTENTION, PAGED_ATTENTION)

# The custom-call targets a lowered pallas_call becomes: Triton (through XLA's own Triton support or
# jaxlib's launcher), Mosaic TPU, Mosaic GPU.
_PALLAS_CALL = re.compile(r'custom_call\s*@"?(?:__gpu\$xla\.gpu\.triton|triton_kernel_call_ffi|tpu_custom_call'
                          r'|mosaic_gpu\w*)\b[^\n]*')
# The kernel's name among the call's attributes: ``name = "..."`` (Triton) or ``kernel_name = "..."`` (TPU).
_KERNEL_NAME = re.compile(r'(?:[\s{,]kernel_name|[\s{,]name) = "([^"\\]*)"')


def pallas_enabled() -> bool:
    """False when ``MVJAX_PALLAS`` is 0/false/no/off: accelerators then use plain XLA."""
    return os.environ.get("MVJAX_PALLAS", "1").strip().lower() not in ("0", "false", "no", "off")


def backend_platform() -> str:
    """The platform of JAX's default backend as ``platform_dependent`` names it: cpu, cuda, rocm, tpu, ..."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


def varying_axes(*arrays) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) any of ``arrays`` varies over: a kernel's output
    varies over all of them. Empty outside ``shard_map``."""
    axes = frozenset()
    for a in arrays:
        if a is not None:
            axes |= jax.typeof(a).manual_axis_type.varying
    return axes


def out_struct(shape, dtype, varying: frozenset) -> jax.ShapeDtypeStruct:
    """A pallas_call's output type, varying over the manual mesh axes ``varying`` (``shard_map``
    with ``check_vma``, the default, wants every kernel output's variance stated)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def vary_like(y: jax.Array, varying: frozenset) -> jax.Array:
    """``y`` typed as varying over the manual mesh axes ``varying`` (an identity, no computation):
    an FFI call's result carries no variance of its own, and the branches of the platform dispatch
    must agree on their output types inside ``shard_map``."""
    missing = tuple(sorted(varying - jax.typeof(y).manual_axis_type.varying))
    return jax.lax.pcast(y, missing, to="varying") if missing else y


def pallas_names(lowered_text: str) -> list[str]:
    """The names of the Pallas kernels in a lowered program's text, in order of appearance
    (``jax.jit(f).trace(*args).lower(lowering_platforms=(p,)).as_text()``: StableHLO for ``cuda``
    (Triton) or ``tpu`` (Mosaic)), one entry per kernel call in the text. The kernel wrappers are
    jitted, so same-shaped calls (a decoder's layers) share one lowered function and appear once.
    Unnamed kernels are left out."""
    names = []
    for call in _PALLAS_CALL.finditer(lowered_text):
        found = _KERNEL_NAME.search(call.group(0))
        if found and found.group(1):
            names.append(found.group(1))
    return names


def float_for_nonfinite_columns(x: jax.Array, y: jax.Array,
                                float_product: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``y``, a kernel's product ``W @ x`` (out, N), with every column whose activations ``x`` (K, N) hold
    NaN or inf replaced by ``float_product(x)``, the float32 product (what the integer kernels'
    dispatch, :func:`mvjax.kernels.int8.int8_matmul` and :func:`mvjax.kernels.int4.int4_matmul`, share).

    Integer codes cannot carry NaN/inf: a kernel that rounds activations to integers gives such a
    column finite garbage (NaN: the step falls back to a default) or NaN everywhere (inf: the
    step is inf). A float matmul gives NaN for a NaN column and, for an inf column, +-inf or NaN
    row by row (signs of the weights met, ``0 * inf``), never a finite value. The exact float
    result costs a float32 copy of the weights (what the kernels avoid), so it runs under
    ``lax.cond`` only when some column is non-finite (``float_product`` sees the other columns
    zeroed); the usual step pays one ``isfinite`` pass over ``x`` (K x N, tiny next to the O x K
    weights) and the branch. (Under ``vmap`` with a batched predicate ``cond`` becomes a select that
    runs both branches; the decoder batches along N instead.)"""
    bad = jnp.any(~jnp.isfinite(x), axis=0)

    def patch(y):
        exact = float_product(jnp.where(bad[None, :], x, jnp.zeros((), x.dtype)))
        return jnp.where(bad[None, :], exact, y)

    return jax.lax.cond(jnp.any(bad), patch, lambda y: y, y)
