"""Pallas kernels for one decode step's attention over the KV cache, on GPU (Triton) and TPU (Mosaic).

The contract is :func:`mvjax.kernels.cache_attention.kernel_cache_attention`'s: one float32 query
per row and head, q (R, H, D); keys and values (R, H, D, S), positions last, stored float32, bf16
(as its uint16 bit patterns) or int8 codes with float32 scales (R, H, S) (value = code * scale);
row r sees the slots ``0 .. positions[r]`` (clamped into the first ``window`` slots, as the C++
kernel does); softmax scale 1/sqrt(D); float32 output (R, H, D). The paged variant reads the same
three kinds from a pool of pages (num_pages, H, D, page_size) through a page table (R,
pages_per_row): row r's position p lives in page ``table[r, p // page_size]`` at offset
``p % page_size``.

Why kernels: XLA computes a step's attention over the whole window for every row (each row's
mask hides the slots it has not reached, but they are read and multiplied all the same), and for
a compact cache it dequantises the window before the products. These kernels are **ragged**: a
row reads only the blocks (or pages) up to its own position, converting the stored values in
registers, with an online (flash-style) softmax over the blocks, so a call over the whole cache
costs what the rows have reached, not the cache's length (:func:`mvjax.nn.kv_cache.step_kernel_used`).

Two variants of each kernel, because Triton and Mosaic want different shapes:

* GPU (Triton, ``platform="cuda"``): a program per (row, head) walks its blocks in a loop whose
  trip count comes from the row's position (Triton has no scalar prefetch). Triton tensors need
  power-of-two dimensions, so head_dim, the block and the page size must be powers of two
  (:func:`gpu_supported`); the last block of a row may overlap the one before (its start is
  clamped inside the cache) and the overlap is masked.
* TPU (Mosaic, ``platform="tpu"``): the positions (and page table) are scalar-prefetched; a
  program per row walks a grid axis of blocks whose index map stops at the row's last block, so
  the blocks past it are neither fetched (the block index repeats) nor computed (``pl.when``).
  Each block holds every head: the last two block dimensions are (head_dim, block) with the
  block a multiple of 128 or the whole cache length, as Mosaic requires.

Numerics: both paths dequantise the same stored values (code * scale in float32, bf16 widened
exactly), so a kernel differs from the XLA path (:func:`xla_attention`) only by float32
reassociation: the blocked score sums, the online softmax's rescaling and the blocked value sums.
Slots past a row's position are never read (their values are masked even inside a block, so a
NaN left there does not leak in, as in the C++ kernel).

``interpret=True`` runs a kernel through Pallas's interpreter on any backend (the tests' way of
checking the kernel bodies on CPU).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from mvjax.kernels.platform import PAGED_ATTENTION as PAGED_NAME
from mvjax.kernels.platform import RAGGED_ATTENTION as RAGGED_NAME
from mvjax.kernels.platform import out_struct, varying_axes

GPU_TILE = 8192  # elements of one (head_dim, block) tile per Triton program: 32 KiB of float32 over 4 warps
TPU_BLOCK_BYTES = 2 << 20  # one stored (heads, head_dim, block) block: x2 (keys, values) x2 (double buffering) in VMEM


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pow2_floor(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def _check_kind(keys, values, key_scale, value_scale) -> str:
    """The cache kind of the stored arrays (float32, bf16 as uint16 bits, int8 with scales)."""
    if keys.dtype != values.dtype:
        raise ValueError(f"keys and values are stored alike, not {keys.dtype} and {values.dtype}")
    if keys.dtype == jnp.int8:
        if key_scale is None or value_scale is None:
            raise ValueError("an int8 cache needs its key and value scales")
        return "int8"
    if keys.dtype == jnp.uint16:
        return "bf16"
    if keys.dtype == jnp.float32:
        return "float32"
    raise ValueError(f"the cache kernels read float32, bf16 (as uint16 bits) or int8 caches, not {keys.dtype}")


def _softmax_scale(head_dim: int) -> np.float32:
    """1/sqrt(D) rounded as the XLA path computes it (``1.0 / jnp.sqrt(jnp.float32(D))``)."""
    return np.float32(1.0) / np.sqrt(np.float32(head_dim))


def _dequantize(stored, scale):
    """Stored values of a block -> float32: bf16 bits widened exactly, int8 codes times their
    per-position scales (broadcast over head_dim), as :func:`mvjax.nn.kv_cache.dequantize` does."""
    if stored.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(stored, jnp.bfloat16).astype(jnp.float32)
    if stored.dtype == jnp.int8:
        return stored.astype(jnp.float32) * scale
    return stored.astype(jnp.float32)


def _online_step(carry, q, k, v, valid, scale):
    """One block of the online softmax. q (..., D, 1); k, v (..., D, B) float32; valid (..., 1, B);
    carry: running max m and sum l (..., 1, 1), unnormalised output acc (..., D, 1). Every block
    passed here holds at least one valid slot, so m is finite after the first."""
    m, l, acc = carry
    s = jnp.sum(k * q, axis=-2, keepdims=True) * scale
    s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    acc = alpha * acc + jnp.sum(jnp.where(valid, v, 0.0) * p, axis=-1, keepdims=True)
    return m_new, l, acc


def _init_carry(lead: tuple, head_dim: int):
    return (jnp.full(lead + (1, 1), -jnp.inf, jnp.float32), jnp.zeros(lead + (1, 1), jnp.float32),
            jnp.zeros(lead + (head_dim, 1), jnp.float32))


# --- GPU (Triton): a program per (row, head), a loop over the row's blocks ------------------------


def _gpu_contiguous_kernel(pos_ref, q_ref, k_ref, v_ref, *rest, window, block, length, int8, scale):
    """Refs: positions (R,), q (D, 1), keys/values (D, S) of this (row, head), int8 scales (1, S),
    output (D, 1)."""
    ks_ref, vs_ref, o_ref = rest if int8 else (None, None, rest[0])
    last = jnp.clip(pos_ref[pl.program_id(0)], 0, window - 1)
    q = q_ref[...]

    def body(j, carry):
        first = j * block
        start = jnp.minimum(first, length - block)  # the last block stays inside the cache
        cols = pl.ds(start, block)
        k = _dequantize(k_ref[:, cols], ks_ref[:, cols] if int8 else None)
        v = _dequantize(v_ref[:, cols], vs_ref[:, cols] if int8 else None)
        slot = start + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        return _online_step(carry, q, k, v, (slot >= first) & (slot <= last), scale)

    m, l, acc = jax.lax.fori_loop(0, jax.lax.div(last, block) + 1, body, _init_carry((), q.shape[0]))
    o_ref[...] = acc / l


def _gpu_paged_kernel(pos_ref, table_ref, q_ref, k_ref, v_ref, *rest, window, page, int8, scale):
    """Refs: positions (R,), table (R, pages_per_row), q (D, 1), the whole key/value pools
    (num_pages, H, D, page), int8 scales (num_pages, H, 1, page), output (D, 1)."""
    ks_ref, vs_ref, o_ref = rest if int8 else (None, None, rest[0])
    r, h = pl.program_id(0), pl.program_id(1)
    last = jnp.clip(pos_ref[r], 0, window - 1)
    q = q_ref[...]

    def body(j, carry):
        at = table_ref[r, j]
        k = _dequantize(k_ref[at, h], ks_ref[at, h] if int8 else None)
        v = _dequantize(v_ref[at, h], vs_ref[at, h] if int8 else None)
        slot = j * page + jax.lax.broadcasted_iota(jnp.int32, (1, page), 1)
        return _online_step(carry, q, k, v, slot <= last, scale)

    m, l, acc = jax.lax.fori_loop(0, jax.lax.div(last, page) + 1, body, _init_carry((), q.shape[0]))
    o_ref[...] = acc / l


def gpu_block(head_dim: int, length: int, block: Optional[int] = None) -> int:
    """The Triton block (positions per loop step): a power of two, at most the cache length, with
    a (head_dim, block) tile of about :data:`GPU_TILE` elements unless ``block`` is given."""
    want = block if block is not None else max(16, GPU_TILE // head_dim)
    return min(_pow2_floor(want), _pow2_floor(length))


def gpu_supported(head_dim: int, page_size: Optional[int] = None) -> bool:
    """Whether the Triton kernels take these shapes: power-of-two head_dim (and page size)."""
    return _is_pow2(head_dim) and (page_size is None or _is_pow2(page_size))


# --- TPU (Mosaic): a program per row, a grid axis over its blocks -------------------------------


def _tpu_kernel(*refs, paged, block, nblocks, window, int8, scale):
    """Refs: positions (R,) [and the flat page table] in SMEM, q (H, D, 1), one block of keys and
    values (H, D, block) [int8 scales (H, 1, block)], output (H, D, 1); scratch m, l (H, 1, 1) and
    acc (H, D, 1) carried along the block axis."""
    pos_ref, refs = refs[0], refs[2:] if paged else refs[1:]
    q_ref, k_ref, v_ref, refs = refs[0], refs[1], refs[2], refs[3:]
    ks_ref, vs_ref, refs = (refs[0], refs[1], refs[2:]) if int8 else (None, None, refs)
    o_ref, m_ref, l_ref, acc_ref = refs
    j = pl.program_id(1)
    last = jnp.clip(pos_ref[pl.program_id(0)], 0, window - 1)

    @pl.when(j == 0)
    def _():
        m_ref[...], l_ref[...], acc_ref[...] = _init_carry((q_ref.shape[0],), q_ref.shape[1])

    @pl.when(j * block <= last)
    def _():
        k = _dequantize(k_ref[...], ks_ref[...] if int8 else None)
        v = _dequantize(v_ref[...], vs_ref[...] if int8 else None)
        slot = j * block + jax.lax.broadcasted_iota(jnp.int32, (1, 1, block), 2)
        m_ref[...], l_ref[...], acc_ref[...] = _online_step((m_ref[...], l_ref[...], acc_ref[...]), q_ref[...],
                                                             k, v, slot <= last, scale)

    @pl.when(j == nblocks - 1)
    def _():
        o_ref[...] = acc_ref[...] / l_ref[...]


def tpu_block(heads: int, head_dim: int, length: int, itemsize: int, block: Optional[int] = None) -> int:
    """The Mosaic block (positions per grid step): a multiple of 128 dividing the cache length with
    one stored block of every head within :data:`TPU_BLOCK_BYTES` (at least 128), or the whole
    length where no multiple of 128 divides it (VMEM then holds the whole length per row: fine for
    the short odd caches of tests, too much for thousands of slots). ``block`` overrides the budget
    (still a divisor)."""
    if length % 128:
        return length
    cap = block if block is not None else max(128, TPU_BLOCK_BYTES // (heads * head_dim * itemsize))
    best = 128
    for b in range(128, min(cap, length) + 1, 128):
        if length % b == 0:
            best = b
    return best


def _tpu_scratch(heads: int, head_dim: int):
    return [pltpu.VMEM((heads, 1, 1), jnp.float32), pltpu.VMEM((heads, 1, 1), jnp.float32),
            pltpu.VMEM((heads, head_dim, 1), jnp.float32)]


_TPU_PARAMS = dict(dimension_semantics=("parallel", "arbitrary"))


# --- entry points --------------------------------------------------------------------------------
# The pallas_calls are built once per static configuration (lru_cache), so the decoder's layers, which
# share their shapes, reuse one traced kernel instead of tracing it again for every layer.


@functools.lru_cache(maxsize=None)
def _ragged_call(platform: str, rows: int, heads: int, head_dim: int, length: int, itemsize: int, int8: bool,
                 window: int, block: int, interpret: bool, varying: frozenset):
    """The contiguous kernel's pallas_call: (positions, q (R, H, D, 1), keys, values[, key scales, value
    scales (R, H, 1, S)]) -> (R, H, D, 1), varying over the mesh axes ``varying``."""
    scale = _softmax_scale(head_dim)
    out_shape = out_struct((rows, heads, head_dim, 1), jnp.float32, varying)
    n_scales = 2 if int8 else 0
    if platform == "cuda":
        column = pl.BlockSpec((None, None, head_dim, 1), lambda r, h: (r, h, 0, 0))
        cache = pl.BlockSpec((None, None, head_dim, length), lambda r, h: (r, h, 0, 0))
        per_slot = pl.BlockSpec((None, None, 1, length), lambda r, h: (r, h, 0, 0))
        kernel = functools.partial(_gpu_contiguous_kernel, window=window, block=block, length=length, int8=int8,
                                   scale=scale)
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=(rows, heads),
            in_specs=[pl.BlockSpec((rows,), lambda r, h: (0,)), column, cache, cache] + [per_slot] * n_scales,
            out_specs=column, name=RAGGED_NAME, interpret=interpret,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))
    nblocks = pl.cdiv(window, block)

    def at_block(r, j, pos):  # the row's block j, or its last one past its position: no new fetch
        return jnp.minimum(j, jax.lax.div(jnp.clip(pos[r], 0, window - 1), block))

    column = pl.BlockSpec((None, heads, head_dim, 1), lambda r, j, pos: (r, 0, 0, 0))
    cache = pl.BlockSpec((None, heads, head_dim, block), lambda r, j, pos: (r, 0, 0, at_block(r, j, pos)))
    per_slot = pl.BlockSpec((None, heads, 1, block), lambda r, j, pos: (r, 0, 0, at_block(r, j, pos)))
    kernel = functools.partial(_tpu_kernel, paged=False, block=block, nblocks=nblocks, window=window, int8=int8,
                               scale=scale)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(rows, nblocks), in_specs=[column, cache, cache] + [per_slot] * n_scales,
        out_specs=column, scratch_shapes=_tpu_scratch(heads, head_dim))
    return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, name=RAGGED_NAME, interpret=interpret,
                          compiler_params=pltpu.CompilerParams(**_TPU_PARAMS))


@functools.lru_cache(maxsize=None)
def _paged_call(platform: str, rows: int, per_row: int, num_pages: int, heads: int, head_dim: int, page: int,
                int8: bool, interpret: bool, varying: frozenset):
    """The paged kernel's pallas_call: (positions, table (R, pages_per_row) on GPU, flat on TPU,
    q (R, H, D, 1), key pages, value pages[, their scales (num_pages, H, 1, page)]) -> (R, H, D, 1),
    varying over the mesh axes ``varying``."""
    window = per_row * page
    scale = _softmax_scale(head_dim)
    out_shape = out_struct((rows, heads, head_dim, 1), jnp.float32, varying)
    n_scales = 2 if int8 else 0
    if platform == "cuda":
        column = pl.BlockSpec((None, None, head_dim, 1), lambda r, h: (r, h, 0, 0))
        whole = lambda shape: pl.BlockSpec(shape, lambda r, h: (0,) * len(shape))  # noqa: E731 - indexed in the kernel
        pool = whole((num_pages, heads, head_dim, page))
        kernel = functools.partial(_gpu_paged_kernel, window=window, page=page, int8=int8, scale=scale)
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=(rows, heads),
            in_specs=[whole((rows,)), whole((rows, per_row)), column, pool, pool]
            + [whole((num_pages, heads, 1, page))] * n_scales,
            out_specs=column, name=PAGED_NAME, interpret=interpret,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))

    def page_of(r, j, pos, tab):  # the row's page j, or its last one past its position: no new fetch
        return tab[r * per_row + jnp.minimum(j, jax.lax.div(jnp.clip(pos[r], 0, window - 1), page))]

    column = pl.BlockSpec((None, heads, head_dim, 1), lambda r, j, pos, tab: (r, 0, 0, 0))
    pages = pl.BlockSpec((None, heads, head_dim, page), lambda r, j, pos, tab: (page_of(r, j, pos, tab), 0, 0, 0))
    per_slot = pl.BlockSpec((None, heads, 1, page), lambda r, j, pos, tab: (page_of(r, j, pos, tab), 0, 0, 0))
    kernel = functools.partial(_tpu_kernel, paged=True, block=page, nblocks=per_row, window=window, int8=int8,
                               scale=scale)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(rows, per_row), in_specs=[column, pages, pages] + [per_slot] * n_scales,
        out_specs=column, scratch_shapes=_tpu_scratch(heads, head_dim))
    return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, name=PAGED_NAME, interpret=interpret,
                          compiler_params=pltpu.CompilerParams(**_TPU_PARAMS))


def _check_platform(platform: str) -> None:
    if platform not in ("cuda", "tpu"):
        raise ValueError(f"no Pallas attention kernel for platform {platform!r} (cuda or tpu)")


@functools.partial(jax.jit, static_argnames=("window", "platform", "block", "interpret"))
def ragged_attention(q: jnp.ndarray, keys, values, positions: jnp.ndarray, window: int,
                     key_scale: Optional[jnp.ndarray] = None, value_scale: Optional[jnp.ndarray] = None, *,
                     platform: str, block: Optional[int] = None, interpret: bool = False) -> jnp.ndarray:
    """Decode attention over a contiguous cache (the module docstring's contract) through the
    ``platform`` variant ("cuda": Triton, "tpu": Mosaic). ``block`` (positions per step) defaults
    to :func:`gpu_block` / :func:`tpu_block`. -> float32 (R, H, D). Jitted (the decoder's layers
    share one trace)."""
    _check_platform(platform)
    int8 = _check_kind(keys, values, key_scale, value_scale) == "int8"
    rows, heads, head_dim, length = keys.shape
    window = min(int(window), length)
    if platform == "cuda":
        if not gpu_supported(head_dim):
            raise ValueError(f"the Triton kernel needs a power-of-two head_dim, not {head_dim}")
        b = gpu_block(head_dim, length, block)
    else:
        b = tpu_block(heads, head_dim, length, keys.dtype.itemsize, block)
    varying = varying_axes(q, keys, values, positions, key_scale, value_scale)
    call = _ragged_call(platform, rows, heads, head_dim, length, keys.dtype.itemsize, int8, window, b, interpret,
                        varying)
    scales = [s.astype(jnp.float32).reshape(rows, heads, 1, length) for s in (key_scale, value_scale)] if int8 else []
    q = q.astype(jnp.float32)[..., None]  # (R, H, D, 1): the query as a column, like one cache slot
    return call(positions.astype(jnp.int32), q, keys, values, *scales)[..., 0]


@functools.partial(jax.jit, static_argnames=("platform", "interpret"))
def paged_attention(q: jnp.ndarray, key_pages, value_pages, table: jnp.ndarray, positions: jnp.ndarray,
                    key_scale: Optional[jnp.ndarray] = None, value_scale: Optional[jnp.ndarray] = None, *,
                    platform: str, interpret: bool = False) -> jnp.ndarray:
    """Decode attention over a paged cache: pages (num_pages, H, D, page_size) of the three kinds
    (int8 scales (num_pages, H, page_size)), ``table`` (R, pages_per_row) int32, ``positions`` (R,)
    (clamped into the row's pages_per_row * page_size slots). A row reads only the pages up to
    its position; table entries past them are never read. On TPU the positions and the flattened
    table are scalar-prefetched into SMEM (R * (pages_per_row + 1) int32 words), and each step
    fetches one whole page of every head (a page size that is a multiple of 128 fills the lanes).
    -> float32 (R, H, D)."""
    _check_platform(platform)
    int8 = _check_kind(key_pages, value_pages, key_scale, value_scale) == "int8"
    num_pages, heads, head_dim, page = key_pages.shape
    rows, per_row = table.shape
    if platform == "cuda" and not gpu_supported(head_dim, page):
        raise ValueError(f"the Triton kernel needs power-of-two head_dim and page size, not {head_dim}, {page}")
    varying = varying_axes(q, key_pages, value_pages, table, positions, key_scale, value_scale)
    call = _paged_call(platform, rows, per_row, num_pages, heads, head_dim, page, int8, interpret, varying)
    scales = ([s.astype(jnp.float32).reshape(num_pages, heads, 1, page) for s in (key_scale, value_scale)]
              if int8 else [])
    table = table.astype(jnp.int32)
    q = q.astype(jnp.float32)[..., None]
    return call(positions.astype(jnp.int32), table if platform == "cuda" else table.reshape(-1), q, key_pages,
                value_pages, *scales)[..., 0]


# --- plain XLA: the fallback and the tests' oracle -------------------------------------------------


def dequantize(stored, scale: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """A stored cache array (..., D, S) -> float32, as :func:`mvjax.nn.kv_cache.dequantize`."""
    if stored.dtype == jnp.int8:
        return stored.astype(jnp.float32) * scale[..., None, :]
    return _dequantize(stored, None)


def xla_attention(q: jnp.ndarray, keys, values, positions: jnp.ndarray, window: int,
                  key_scale: Optional[jnp.ndarray] = None, value_scale: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """The kernels' contract in plain XLA, the operations of :func:`mvjax.nn.kv_cache.attend`'s XLA
    path for one query: dequantise the first ``window`` slots, masked softmax, product. (Unlike
    the kernels it multiplies every slot of the window, so a NaN stored past a row's position
    reaches that row.)"""
    _check_kind(keys, values, key_scale, value_scale)
    window = min(int(window), keys.shape[-1])
    cut = lambda a: None if a is None else a[..., :window]  # noqa: E731
    k, v = dequantize(cut(keys), cut(key_scale)), dequantize(cut(values), cut(value_scale))
    last = jnp.clip(positions.astype(jnp.int32), 0, window - 1)
    mask = (jnp.arange(window)[None, :] <= last[:, None])[:, None]  # (R, 1, S)
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    scores = jnp.einsum("rhd,rhds->rhs", q.astype(jnp.float32), k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("rhs,rhds->rhd", probs, v)


def gather_pages(pages, table: jnp.ndarray) -> jnp.ndarray:
    """Pages (num_pages, ..., page_size) and a table (R, pages_per_row) -> each row's pages in
    order, contiguous: (R, ..., pages_per_row * page_size). Out-of-range table entries are clamped."""
    rows, per_row = table.shape
    got = jnp.take(pages, table.reshape(-1), axis=0, mode="clip")  # (R * per_row, ..., page)
    got = got.reshape((rows, per_row) + pages.shape[1:])
    got = jnp.moveaxis(got, 1, -2)  # (R, ..., per_row, page)
    return got.reshape(got.shape[:-2] + (per_row * pages.shape[-1],))


def paged_attention_xla(q: jnp.ndarray, key_pages, value_pages, table: jnp.ndarray, positions: jnp.ndarray,
                        key_scale: Optional[jnp.ndarray] = None,
                        value_scale: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """:func:`paged_attention` in plain XLA: gather each row's pages into the contiguous layout,
    then :func:`xla_attention` over them (the fallback, and the kernels' oracle). It reads every
    table entry, so entries past a row's position must still name pages holding finite values."""
    gather = lambda a: None if a is None else gather_pages(a, table)  # noqa: E731
    window = table.shape[1] * key_pages.shape[-1]
    return xla_attention(q, gather(key_pages), gather(value_pages), positions, window,
                         gather(key_scale), gather(value_scale))
