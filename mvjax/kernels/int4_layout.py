"""The group-wise 4-bit weight layout, its packing, and the plain-XLA product (the oracle).

An int4 matrix of shape (out, in) with group size ``G`` (``in % G == 0``, ``in`` even) is stored as
``{"q4": uint8 (out, in // 2), "scale": float16 (out, in // G), "min": float16 (out, in // G)}``:

* code ``q[o, i]`` in 0..15 is the low nibble of ``q4[o, i // 2]`` for even ``i`` and its high
  nibble for odd ``i`` (two neighbours along the input dimension share a byte, so a kernel reading
  a row reads it front to back);
* ``w[o, i] ~= scale[o, g] * q[o, i] + min[o, g]`` with ``g = i // G`` (affine per group: a
  symmetric quantiser is the case ``min = -8 * scale``);
* ``G`` is not stored: it is ``in // scale.shape[1]``.

Why this shape: a decode step reads every weight once, so the bytes read set its time; 4 bits a
weight plus 32 bits of scale and minimum per group (G = 64: 4.5 bits a weight) is about 0.56 of
int8's bytes. Scales and minimums in float16 (not bfloat16): they are 1/16 of the bytes either
way, and float16's 10-bit mantissa adds ~100x less error than bfloat16's 7 bits to every weight.

:func:`int4_matmul_xla` is the oracle every kernel is tested against: it unpacks the codes,
dequantises in float32 and runs one float32 dot.

:mod:`mvjax.kernels.int4` runs the product where kernels exist.
"""

from __future__ import annotations

import jax.numpy as jnp

INT4_LEVELS = 15  # codes 0..15


def is_int4(entry) -> bool:
    """Whether ``entry`` is an int4 matrix in the layout above."""
    return isinstance(entry, dict) and "q4" in entry and "scale" in entry and "min" in entry


def group_size(entry: dict) -> int:
    """The input positions per scale (``G``)."""
    return 2 * entry["q4"].shape[1] // entry["scale"].shape[1]


def unpack_codes(q4: jnp.ndarray) -> jnp.ndarray:
    """uint8 (out, in // 2) -> the codes (out, in) as uint8 in 0..15 (low nibble first)."""
    low = q4 & jnp.uint8(0x0F)
    high = q4 >> jnp.uint8(4)
    return jnp.stack([low, high], axis=-1).reshape(q4.shape[0], 2 * q4.shape[1])


def pack_codes(q: jnp.ndarray) -> jnp.ndarray:
    """Codes (out, in) in 0..15 (``in`` even) -> uint8 (out, in // 2): the inverse of :func:`unpack_codes`."""
    q = q.astype(jnp.uint8).reshape(q.shape[0], q.shape[1] // 2, 2)
    return q[..., 0] | (q[..., 1] << jnp.uint8(4))


def dequantize(entry: dict) -> jnp.ndarray:
    """The float32 matrix (out, in) an int4 entry stands for."""
    q = unpack_codes(entry["q4"]).astype(jnp.float32)
    out, width = q.shape
    groups = entry["scale"].shape[1]
    q = q.reshape(out, groups, width // groups)
    w = q * entry["scale"].astype(jnp.float32)[:, :, None] + entry["min"].astype(jnp.float32)[:, :, None]
    return w.reshape(out, width)


def int4_matmul_xla(entry: dict, x: jnp.ndarray) -> jnp.ndarray:
    """``dequantize(entry) @ x`` for x (in, N) -> float32 (out, N) in plain XLA: the oracle, and what
    runs where no kernel does. Float arithmetic throughout, so NaN/inf in ``x`` propagate as in a
    float32 matmul; on CPU XLA materialises the float32 weights (the kernels exist to avoid that)."""
    return jnp.dot(dequantize(entry), x.astype(jnp.float32), preferred_element_type=jnp.float32)
