"""A Pallas kernel for the group-wise int4 weight-only product on GPU (Triton) and TPU (Mosaic).

``y (O, N) = dequantize(q4, scale, min) (O, K) @ x (K, N)`` -> float32 for the layout of
:mod:`mvjax.kernels.int4` (two 4-bit codes a byte along the input dimension, low nibble first; a
float16 scale and minimum per group of ``G`` inputs: ``w = scale * q + min``), the contract of
:func:`mvjax.kernels.int4.int4_matmul_xla`. A decode step reads every weight once for a few
columns (N = rows, 1..128; more in prefill), so the product is bound by the weight bytes: the
kernel streams the packed codes (half a byte a weight) and the group parameters tile by tile and
unpacks them in registers instead of reading a float copy.

How it computes, group by group (``g``: the group, ``i`` its inputs)::

    y[o, n] = sum_g  scale[o, g] * (sum_i q[o, i] * x[i, n])  +  min[o, g] * (sum_i x[i, n])

* The codes of a group are split by nibble without interleaving them: input ``2b`` is byte ``b``'s
  low nibble and ``2b + 1`` its high nibble, so the wrapper splits x into its even and odd rows and
  the kernel forms ``low @ x_even + high @ x_odd``.
* Exact products on the matrix units, as in :mod:`mvjax.kernels.pallas_int8`: a code 0..15 is
  exact in bf16 and x is split into three bf16 parts that sum to it exactly
  (:func:`~mvjax.kernels.pallas_int8.split_bf16`), so every ``q * x`` is formed exactly and summed
  in float32 (six bf16 dots a group: two nibbles, three parts).
* The group's scale multiplies that sum once (as the int8 kernel's row scale does), and its
  minimum multiplies the group's sum of x (computed once per call by XLA, K / G x N values, shared
  by every row).

This is the oracle's sum regrouped (distributivity and reassociation), not the same float
operations: the oracle rounds each weight ``fl(scale * q + min)`` once and each product once, the
kernel rounds the per-group sums. Both lie within a few ``K`` float32 ulps of the exact product of
the stored weights, measured against ``sum_i (|scale * q_i| + |min|) |x_i|`` (the kernel's) and
``sum_i |w_i| |x_i|`` (the oracle's), which for a min/max quantiser differ by at most ~3x
(``|scale * q| <= |max - min|``); tests/test_pallas_int4.py states the bound. Dequantising to the
oracle's float32 weights first would make only the summation order differ, but a float32 weight has
up to 24 significant bits, so exact products would take nine bf16 dots instead of six (or a
float32 dot off the matrix units): the regrouping keeps the decode step at the weight-streaming cost.

NaN and inf keep float32 semantics. A regrouped sum would get them wrong (``min * inf`` plus
``scale * 0 * inf`` is NaN where the oracle's single weight gives +-inf), so a column whose x holds
a non-finite value is computed the oracle's way for its outcome, which only depends on the signs: a
float32 product of such a column is non-finite in every row, NaN if the column has a NaN, a weight
that is exactly 0 meets an inf, or infinities of both signs meet, else the one infinity. The kernel
dequantises the weights as the oracle does (``scale * q`` is exact, so ``fl(scale * q + min)`` is
the oracle's weight bit for bit), takes their signs (-1, 0, +1, exact in bf16) and multiplies them
with the column's non-finite values only (finite ones zeroed): one more bf16 dot a nibble, whose
NaN/+inf/-inf is the oracle's. That pass runs only when the wrapper's flag says some column of x is
non-finite (a branch in the kernel, no host round trip), so a finite step pays nothing for it.
(Finite values near float32's limits can still overflow differently in the two sums.)

Tiles: the kernel covers the rows in whole tiles of ``tile_o`` and every group of K; the leftover
rows go through the oracle on a slice, so an odd-sized matrix is never copied whole; x is padded
along N. Triton (cuda) reads a row tile's codes across the whole of K and loops over steps of
whole groups, the last step's leftover groups unrolled after the loop; it wants power-of-two
operands of at least 16, so it takes group sizes ``G`` with ``G / 2`` a power of two >= 16
(G = 32, 64, 128, ...) and at least 16 rows; other shapes run through XLA alone. Mosaic (tpu)
wants a block's last dimension a multiple of 128 or whole: the group parameters (O, K / G) are
read whole along K (K / G is rarely a multiple of 128), so a row tile's codes are too and the
kernel unrolls its loop over the groups with static offsets. The TPU body is checked in Pallas's
TPU interpreter and lowers to Mosaic, but has not been compiled on a TPU (none at hand): its
unaligned static lane slices (a group's G / 2 bytes, its scale column) are the part Mosaic may
refuse.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from mvjax.kernels import int4_layout
from mvjax.kernels.pallas_int8 import split_bf16
from mvjax.kernels.platform import INT4_MATMUL as NAME
from mvjax.kernels.platform import out_struct, varying_axes

# (rows, reduction, columns) tile caps. GPU: 32-row programs keep the grid wide enough to load a whole
# GPU from the few thousand rows of a decoder matrix; each loop step covers 256 inputs (several
# groups). TPU: 256-row tiles (a (256, K / 2) uint8 block is 704 KiB at K = 5632); the reduction is
# whole (see the module docstring), its cap unused; 128 columns keep the six activation parts (K / 2,
# 128) bf16 at 4.3 MiB for K = 5632 (twice that double-buffered, with the codes ~10 MiB of VMEM).
GPU_TILES = (32, 256, 64)
TPU_TILES = (256, 0, 128)
_PARTS = 3  # bf16 parts of each activation


def _pow2_floor(n: int) -> int:
    return 1 << (int(n).bit_length() - 1) if n > 0 else 0


def _codes(packed: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """uint8 bytes -> (low nibbles, high nibbles) as int32 0..15 (widened first: integer ops on
    8-bit vectors are not what every target does best)."""
    b = packed.astype(jnp.int32)
    return b & 15, b >> 4


def _bf16(codes: jnp.ndarray) -> jnp.ndarray:
    return codes.astype(jnp.float32).astype(jnp.bfloat16)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _is_bad(v: jnp.ndarray) -> jnp.ndarray:
    """NaN or +-inf, from comparisons only (every Pallas target lowers them)."""
    return (v != v) | (jnp.abs(v) == jnp.inf)


def _group_sum(packed, parts_even, parts_odd):
    """One group's ``sum_i q_i x_i`` (tile_o, tile_n), float32, every product exact."""
    low, high = _codes(packed)
    low, high = _bf16(low), _bf16(high)
    total = _dot(low, parts_even[0]) + _dot(high, parts_odd[0])
    for even, odd in zip(parts_even[1:], parts_odd[1:]):
        total = total + _dot(low, even) + _dot(high, odd)
    return total


def _group_nonfinite(packed, scale, minimum, hi_even, hi_odd):
    """One group's contribution to a non-finite column: the signs of the oracle's float32 weights
    times the non-finite values of x (finite ones zeroed), (tile_o, tile_n)."""
    low, high = _codes(packed)

    def signs(codes):
        w = codes.astype(jnp.float32) * scale + minimum  # the oracle's weight, bit for bit
        return (jnp.where(w > 0, 1.0, 0.0) - jnp.where(w < 0, 1.0, 0.0)).astype(jnp.bfloat16)

    def bad(hi):
        return jnp.where(_is_bad(hi), hi, jnp.zeros_like(hi))

    return _dot(signs(low), bad(hi_even)) + _dot(signs(high), bad(hi_odd))


def _over_groups(fn: Callable, acc, groups: int, per_step: int, loop: bool):
    """``acc = fn(g, acc)`` for g in 0..groups-1: on Triton (``loop``) a loop over steps of
    ``per_step`` groups (traced offsets) and the leftover groups unrolled after it; on Mosaic
    unrolled throughout (static offsets)."""
    if not loop:
        for g in range(groups):
            acc = fn(g, acc)
        return acc
    steps = groups // per_step

    def step(i, acc):
        for j in range(per_step):
            acc = fn(i * per_step + j, acc)
        return acc

    acc = jax.lax.fori_loop(0, steps, step, acc) if steps else acc
    for g in range(steps * per_step, groups):
        acc = fn(g, acc)
    return acc


def _kernel(flag_ref, w_ref, s_ref, m_ref, *refs, group: int, per_step: int, loop: bool):
    """Refs: the non-finite flag (1,) int32; codes (tile_o, K / 2) uint8; scales and minimums
    (tile_o, K / G) float16; x's parts, even rows then odd rows (K / 2, tile_n) bf16 each; the group
    sums of x (K / G, tile_n) and the non-finite column flags (1, tile_n), float32; the output
    (tile_o, tile_n) float32."""
    x_refs, xs_ref, bad_ref, o_ref = refs[:2 * _PARTS], refs[2 * _PARTS], refs[2 * _PARTS + 1], refs[-1]
    half, groups = group // 2, s_ref.shape[1]

    def at(g):
        """The slices of group g (traced or static): its bytes, activation rows, parameters."""
        start = g * half
        if not isinstance(start, int):
            start = pl.multiple_of(start, half)
        rows = pl.ds(start, half)
        return (w_ref[:, rows], [r[rows, :] for r in x_refs],
                s_ref[:, pl.ds(g, 1)].astype(jnp.float32), m_ref[:, pl.ds(g, 1)].astype(jnp.float32))

    def finite(g, acc):
        packed, parts, scale, minimum = at(g)
        total = _group_sum(packed, parts[:_PARTS], parts[_PARTS:])
        return acc + total * scale + minimum * xs_ref[pl.ds(g, 1), :]

    def nonfinite(g, acc):
        packed, parts, scale, minimum = at(g)
        return acc + _group_nonfinite(packed, scale, minimum, parts[0], parts[_PARTS])

    zeros = jnp.zeros(o_ref.shape, jnp.float32)
    y = _over_groups(finite, zeros, groups, per_step, loop)

    def patch(y):
        bad = _over_groups(nonfinite, zeros, groups, per_step, loop)
        return jnp.where(bad_ref[...] > 0, bad, y)

    o_ref[...] = jax.lax.cond(flag_ref[0] > 0, patch, lambda y: y, y)


def _xla(q4, scale, mins, x):
    """The oracle on what the kernel's tiles leave over."""
    return int4_layout.int4_matmul_xla({"q4": q4, "scale": scale, "min": mins}, x)


def tiles(platform: str, out: int, k: int, n: int, group: int,
          caps: Optional[tuple] = None) -> tuple[int, int, int, int]:
    """(tile_o, groups a loop step, tile_n, padded N) for an (out, k) @ (k, n) product with groups of
    ``group`` inputs; tile_o 0 when the kernel takes no part (too small for its tiles, or a group
    size Triton cannot load)."""
    if platform == "cuda":
        co, ck, cn = caps or GPU_TILES
        half = group // 2
        to = _pow2_floor(min(out, co))
        if to < 16 or half < 16 or half != _pow2_floor(half):
            return 0, 0, 0, n
        tn = max(16, min(_pow2_floor(cn), 1 << max(n - 1, 0).bit_length()))
        return to, max(1, min(k, ck) // group), tn, pl.cdiv(n, tn) * tn
    if platform == "tpu":
        co, _, cn = caps or TPU_TILES
        to = out if out < 32 else 32 * max(1, min(out, co) // 32)
        if n <= cn:
            return to, 1, n, n
        return to, 1, cn, pl.cdiv(n, cn) * cn
    raise ValueError(f"no Pallas int4 kernel for platform {platform!r} (cuda or tpu)")


@functools.lru_cache(maxsize=None)
def _call(platform: str, o_main: int, k: int, group: int, n_pad: int, to: int, per_step: int, tn: int,
          interpret, varying: frozenset):
    """The kernel's pallas_call over the first ``o_main`` rows: (flag, q4, scale, min, six x parts,
    group sums, column flags) -> (o_main, n_pad), varying over the mesh axes ``varying``. Built once
    per configuration, so the decoder's layers (which share their shapes) reuse one traced kernel."""
    shape = out_struct((o_main, n_pad), jnp.float32, varying)
    half, groups = k // 2, k // group
    kernel = functools.partial(_kernel, group=group, per_step=per_step, loop=platform == "cuda")
    if platform == "cuda":
        return pl.pallas_call(
            kernel, out_shape=shape, grid=(o_main // to, n_pad // tn),
            in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), pl.BlockSpec((to, half), lambda i, j: (i, 0))]
            + [pl.BlockSpec((to, groups), lambda i, j: (i, 0))] * 2
            + [pl.BlockSpec((half, tn), lambda i, j: (0, j))] * (2 * _PARTS)
            + [pl.BlockSpec((groups, tn), lambda i, j: (0, j)), pl.BlockSpec((1, tn), lambda i, j: (0, j))],
            out_specs=pl.BlockSpec((to, tn), lambda i, j: (i, j)), name=NAME, interpret=interpret,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3))
    # TPU: the flag is scalar-prefetched into SMEM (the index maps take it as a trailing argument).
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(o_main // to, n_pad // tn),
        in_specs=[pl.BlockSpec((to, half), lambda i, j, f: (i, 0))]
        + [pl.BlockSpec((to, groups), lambda i, j, f: (i, 0))] * 2
        + [pl.BlockSpec((half, tn), lambda i, j, f: (0, j))] * (2 * _PARTS)
        + [pl.BlockSpec((groups, tn), lambda i, j, f: (0, j)), pl.BlockSpec((1, tn), lambda i, j, f: (0, j))],
        out_specs=pl.BlockSpec((to, tn), lambda i, j, f: (i, j)))
    return pl.pallas_call(
        kernel, out_shape=shape, grid_spec=grid_spec, name=NAME, interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")))


@functools.partial(jax.jit, static_argnames=("platform", "caps", "interpret"))
def int4_matmul(q4: jnp.ndarray, scale: jnp.ndarray, mins: jnp.ndarray, x: jnp.ndarray, *, platform: str,
                interpret=False, caps: Optional[tuple] = None) -> jnp.ndarray:
    """``dequantize({"q4": q4, "scale": scale, "min": mins}) @ x`` for the int4 layout of
    :mod:`mvjax.kernels.int4` (q4 uint8 (O, K / 2), scale and min float16 (O, K / G)) and float x
    (K, N) -> float32 (O, N), through the ``platform`` variant ("cuda": Triton, "tpu": Mosaic) of the
    kernel, the rows its tiles leave over through the oracle (module docstring). ``interpret``:
    run it in Pallas's interpreter (True, or ``pltpu.InterpretParams()`` for the TPU one). ``caps``:
    the (rows, reduction, columns) tile caps, default :data:`GPU_TILES` / :data:`TPU_TILES`. Jitted,
    so the decoder's same-shaped products trace it once."""
    out, k = q4.shape[0], 2 * q4.shape[1]
    groups, n = scale.shape[1], x.shape[1]
    group = k // groups
    x = x.astype(jnp.float32)
    to, per_step, tn, n_pad = tiles(platform, out, k, n, group, caps)
    if to == 0:
        return _xla(q4, scale, mins, x)
    o_main = out - out % to
    pad = lambda a: jnp.pad(a, ((0, 0), (0, n_pad - n)))  # noqa: E731
    parts = [pad(p) for rows in (x[0::2], x[1::2]) for p in split_bf16(rows)]
    bad = ~jnp.isfinite(x)
    column_bad = jnp.any(bad, axis=0, keepdims=True)
    # The group sums the minimums multiply; a non-finite column's are replaced by the patch, so its
    # values are zeroed here (nothing non-finite enters the regrouped sum).
    sums = jnp.where(bad, 0.0, x).reshape(groups, group, n).sum(axis=1)
    flag = jnp.any(column_bad).astype(jnp.int32).reshape(1)
    call = _call(platform, o_main, k, group, n_pad, to, per_step, tn, interpret, varying_axes(q4, scale, mins, x))
    y = call(flag, q4, scale, mins, *parts, pad(sums), pad(column_bad.astype(jnp.float32)))[:, :n]
    if o_main < out:  # the leftover rows
        y = jnp.concatenate([y, _xla(q4[o_main:], scale[o_main:], mins[o_main:], x)])
    return y
