"""A Pallas kernel for the int8 weight-only product on GPU (Triton) and TPU (Mosaic).

``y (O, N) = (q (O, K) int8 * scale (O,)[:, None]) @ x (K, N)`` -> float32, the contract of
:func:`mvjax.kernels.int8.int8_matmul_xla`. Decoding reads every weight once per step for a few
columns (N = rows, 1..128; more in prefill), so the product is bound by the weight bytes: the
kernel streams the int8 codes tile by tile (over O and K) and converts them in registers instead
of reading a float copy.

Exact products on the matrix units: an int8 code is exact in bf16, and the wrapper splits each
float32 activation into three bf16 parts that sum to it exactly (the top 8 significant bits, the
next 8, the last 8: ``x = hi + mid + lo``, by truncating the bit pattern), so the three bf16 dots
``codes @ hi + codes @ mid + codes @ lo`` form every product ``code * x`` exactly (15 significant
bits) and accumulate in float32, as a float32 dot would, at a bf16 dot's speed; the per-row scale
multiplies each output once at the end, as in the XLA path. The result therefore differs from
:func:`~mvjax.kernels.int8.int8_matmul_xla` by float32 reassociation only. NaN and inf keep
float semantics: a non-finite activation goes whole into ``hi`` (its ``mid``/``lo`` are 0), so
``0 * inf`` gives NaN, opposite infinities give NaN, a NaN column is NaN, as in a float32 product.
(Parts of a value below float32's normal range may lose their last bits: ~1e-38 absolute.)

Tiles: the kernel covers the largest O and K multiples of its tiles, and the wrapper adds the
leftover rows (O) and columns (K) through XLA on slices, so an odd-sized weight matrix is never
copied whole to pad it (only its small leftovers are); the activations are padded along N, which
is cheap. Triton wants power-of-two tiles of at least 16 (a matrix smaller than that runs through
XLA alone); Mosaic wants the last two block dimensions multiples of (32 for int8 rows, 128) or
the whole dimension.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from mvjax.kernels.platform import INT8_MATMUL as NAME
from mvjax.kernels.platform import out_struct, varying_axes

# (rows, reduction, columns) tile caps. GPU: 32-row programs keep the grid wide enough to load a
# whole GPU from the few thousand rows of a decoder matrix. TPU: 256 x 512 int8 tiles (128 KiB).
GPU_TILES = (32, 256, 64)
TPU_TILES = (256, 512, 256)


def _pow2_floor(n: int) -> int:
    return 1 << (int(n).bit_length() - 1) if n > 0 else 0


def split_bf16(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """float32 x -> bf16 (hi, mid, lo) with ``hi + mid + lo == x`` exactly for finite x (each part
    the next 8 significant bits, cut by truncation so no part rounds up or overflows). A NaN or inf
    goes whole into ``hi``, its ``mid`` and ``lo`` are 0."""
    x = x.astype(jnp.float32)

    def top(v):  # v with its low 16 bits cleared: exactly a bf16
        bits = jax.lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0xFFFF0000)
        return jax.lax.bitcast_convert_type(bits, jnp.float32)

    finite = jnp.isfinite(x)
    hi = jnp.where(finite, top(x), x)
    rest = jnp.where(finite, x - hi, 0.0)  # exact: the bits hi left out
    mid = top(rest)
    lo = rest - mid  # exact, at most 8 significant bits
    return hi.astype(jnp.bfloat16), mid.astype(jnp.bfloat16), lo.astype(jnp.bfloat16)


def _three_dots(w, hi, mid, lo):
    """codes (as bf16) times the activation's three parts, float32 accumulation."""
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    return dot(w, hi) + dot(w, mid) + dot(w, lo)


def _gpu_kernel(w_ref, hi_ref, mid_ref, lo_ref, s_ref, o_ref, *, tile_k, steps):
    """Refs: codes (tile_o, K), activation parts (K, tile_n), scales (tile_o, 1), output (tile_o, tile_n);
    a loop over the ``steps`` K tiles the kernel covers."""
    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * tile_k, tile_k), tile_k)
        return acc + _three_dots(w_ref[:, ks].astype(jnp.bfloat16), hi_ref[ks, :], mid_ref[ks, :], lo_ref[ks, :])

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc * s_ref[...]


def _tpu_kernel(w_ref, hi_ref, mid_ref, lo_ref, s_ref, o_ref, acc_ref):
    """Refs: codes (tile_o, tile_k), activation parts (tile_k, tile_n), scales (tile_o, 1), output and
    its float32 accumulator (tile_o, tile_n), carried along the last grid axis (K)."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    w = w_ref[...].astype(jnp.float32).astype(jnp.bfloat16)
    acc_ref[...] += _three_dots(w, hi_ref[...], mid_ref[...], lo_ref[...])

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...] * s_ref[...]


def _xla(q, scale, x):
    """The plain-XLA product of :func:`mvjax.kernels.int8.int8_matmul_xla` (which imports this module),
    for what the kernel's tiles leave over."""
    return jnp.dot(q.astype(jnp.float32), x, preferred_element_type=jnp.float32) * scale[:, None]


def tiles(platform: str, out: int, k: int, n: int, caps: Optional[tuple] = None) -> tuple[int, int, int, int]:
    """(tile_o, tile_k, tile_n, padded N) for a (out, k) @ (k, n) product; tile_o or tile_k 0 when
    the kernel takes no part (too small for its tiles)."""
    if platform == "cuda":
        co, ck, cn = caps or GPU_TILES
        to, tk = _pow2_floor(min(out, co)), _pow2_floor(min(k, ck))
        if to < 16 or tk < 16:
            return 0, 0, 0, n
        tn = max(16, min(_pow2_floor(cn), 1 << max(n - 1, 0).bit_length()))
        return to, tk, tn, pl.cdiv(n, tn) * tn
    if platform == "tpu":
        co, ck, cn = caps or TPU_TILES
        to = out if out < 32 else 32 * max(1, min(out, co) // 32)
        tk = k if k < 128 else 128 * max(1, min(k, ck) // 128)
        if n <= cn:
            return to, tk, n, n
        return to, tk, cn, pl.cdiv(n, cn) * cn
    raise ValueError(f"no Pallas int8 kernel for platform {platform!r} (cuda or tpu)")


@functools.lru_cache(maxsize=None)
def _call(platform: str, o_main: int, k: int, k_main: int, n_pad: int, to: int, tk: int, tn: int, interpret: bool,
          varying: frozenset):
    """The kernel's pallas_call over the first ``o_main`` rows and ``k_main`` columns of q (O, K):
    (q, hi, mid, lo (K, n_pad), scales (O, 1)) -> (o_main, n_pad), varying over the mesh axes
    ``varying``. Built once per configuration, so the decoder's layers (which share their shapes)
    reuse one traced kernel."""
    shape = out_struct((o_main, n_pad), jnp.float32, varying)
    if platform == "cuda":
        return pl.pallas_call(
            functools.partial(_gpu_kernel, tile_k=tk, steps=k_main // tk), out_shape=shape,
            grid=(o_main // to, n_pad // tn),
            in_specs=[pl.BlockSpec((to, k), lambda i, j: (i, 0))]
            + [pl.BlockSpec((k, tn), lambda i, j: (0, j))] * 3
            + [pl.BlockSpec((to, 1), lambda i, j: (i, 0))],
            out_specs=pl.BlockSpec((to, tn), lambda i, j: (i, j)), name=NAME, interpret=interpret,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3))
    return pl.pallas_call(
        _tpu_kernel, out_shape=shape, grid=(o_main // to, n_pad // tn, k_main // tk),
        in_specs=[pl.BlockSpec((to, tk), lambda i, j, kk: (i, kk))]
        + [pl.BlockSpec((tk, tn), lambda i, j, kk: (kk, j))] * 3
        + [pl.BlockSpec((to, 1), lambda i, j, kk: (i, 0))],
        out_specs=pl.BlockSpec((to, tn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((to, tn), jnp.float32)], name=NAME, interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")))


@functools.partial(jax.jit, static_argnames=("platform", "caps", "interpret"))
def int8_matmul(q: jnp.ndarray, scale: jnp.ndarray, x: jnp.ndarray, *, platform: str,
                caps: Optional[tuple] = None, interpret: bool = False) -> jnp.ndarray:
    """``(q * scale[:, None]) @ x`` for int8 q (O, K), float32 scale (O,), float x (K, N) -> float32
    (O, N) through the ``platform`` variant ("cuda": Triton, "tpu": Mosaic) of the kernel, the
    leftover rows and columns of its tiles through XLA (see the module docstring). ``caps``: the
    (rows, reduction, columns) tile caps, default :data:`GPU_TILES` / :data:`TPU_TILES`. Jitted, so the
    decoder's same-shaped products trace it once."""
    out, k = q.shape
    n = x.shape[1]
    scale = scale.astype(jnp.float32)
    x = x.astype(jnp.float32)
    to, tk, tn, n_pad = tiles(platform, out, k, n, caps)
    if to == 0:
        return _xla(q, scale, x)
    o_main, k_main = out - out % to, k - k % tk
    parts = [jnp.pad(p, ((0, 0), (0, n_pad - n))) for p in split_bf16(x)]
    call = _call(platform, o_main, k, k_main, n_pad, to, tk, tn, interpret, varying_axes(q, scale, x))
    y = call(q, *parts, scale.reshape(out, 1))[:, :n]
    if k_main < k:  # the reduction's leftover columns
        y = y + _xla(q[:o_main, k_main:], scale[:o_main], x[k_main:])
    if o_main < out:  # the leftover rows
        y = jnp.concatenate([y, _xla(q[o_main:], scale[o_main:], x)])
    return y
