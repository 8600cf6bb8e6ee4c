"""A paged first-stage KV cache: a pool of fixed-size pages shared by every row, found through a page table.

A whole-block cache (:mod:`mvjax.nn.kv_cache`) gives every row the block's positions (2048 at the released
shape) whether the utterance uses them or not; real utterances use a fraction, so on an accelerator memory,
not compute, caps how many run at once. Here each layer's keys and values are instead a pool of pages,

* keys and values: ``(num_pages, heads, head_dim, page_size)``: float32, bf16 as its uint16 bit patterns, or
  int8 as ``{"q": int8 (num_pages, heads, head_dim, page_size), "scale": float32 (num_pages, heads,
  page_size)}`` (the same per-vector quantisation as the whole-block cache, so a row's stored bytes are the
  same whichever layout holds them);
* a page table ``(rows, pages_per_row)`` int32: row ``r``'s position ``p`` lives in page
  ``table[r, p // page_size]`` at offset ``p % page_size``. An entry equal to ``num_pages`` (see
  :func:`empty_table`) means no page: writes there are dropped and reads return some page's (finite) values,
  which attention masks out (only positions at or below a row's own are read, and the engine hands a row its
  pages before it writes there).

The host decides which pages a row owns (:class:`mvjax.inference.engine.FirstStageEngine` with ``page_size``);
these functions only follow the table. :func:`attend` is the one read path: on CPU it gathers each row's
pages into the contiguous ``(rows, heads, head_dim, window)`` layout and runs the whole-block cache's
attention (:func:`mvjax.nn.kv_cache.attend`) on that copy; a decode step lowered for a GPU or TPU reads the
pages in place through the paged Pallas kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mvjax.kernels.cache_attention import paged_step_attention
from mvjax.nn import kv_cache
from mvjax.nn.config import GPTConfig


def pages_per_row(block_size: int, page_size: int) -> int:
    """Pages a row needs to hold the whole block (the page table's width)."""
    return -(-int(block_size) // int(page_size))


def pages_for(positions: int, page_size: int) -> int:
    """Pages that hold positions ``0 .. positions - 1`` of one row."""
    return -(-max(0, int(positions)) // int(page_size))


def bytes_per_page(config: GPTConfig, page_size: int, kind: str) -> int:
    """Bytes of one page over every layer, keys and values (int8 scales included)."""
    return kv_cache.bytes_per_slot(config, kind) * int(page_size)


def init_pages(config: GPTConfig, num_pages: int, page_size: int, kind="float32") -> list:
    """Per layer (key pages, value pages), zero-filled, in the layout of the module docstring: a page pool is
    laid out as a whole-block cache whose rows are pages and whose length is the page size."""
    return kv_cache.init_cache(config, num_pages, page_size, kind)


def num_pages(pages: list) -> int:
    """Pages in a pool."""
    keys = pages[0][0]
    return (keys["q"] if isinstance(keys, dict) else keys).shape[0]


def page_size(pages: list) -> int:
    """Positions per page of a pool."""
    return kv_cache.length(pages)


def empty_table(rows: int, width: int, pool_pages: int):
    """A page table of ``rows`` rows owning no page (every entry ``pool_pages``), as numpy int32."""
    return np.full((rows, width), pool_pages, np.int32)


def stored(entry, update: jnp.ndarray):
    """``update`` (..., head_dim, T) float in the stored kind of ``entry`` (an array or an int8 dict)."""
    if isinstance(entry, dict):
        return kv_cache.quantize(update)
    if entry.dtype == jnp.uint16:
        return kv_cache._to_bits(update)  # the whole-block cache's bf16 storage
    return update.astype(entry.dtype)


def write_stored(entry, values, table: jnp.ndarray, positions: jnp.ndarray):
    """``entry`` (a layer's key or value pages) with ``values`` (R, H, D, T), already in the stored kind
    (a dict of ``q`` (R, H, D, T) and ``scale`` (R, H, T) for int8), written at ``positions`` (R, T) of the
    rows whose page tables are ``table`` (R, pages_per_row). Positions whose page is missing are dropped."""
    if isinstance(entry, dict):
        return {name: write_stored(entry[name], values[name], table, positions) for name in ("q", "scale")}
    size = entry.shape[-1]
    page = jnp.take_along_axis(table, positions // size, axis=1, mode="clip")  # (R, T)
    page = jnp.where(positions < table.shape[1] * size, page, entry.shape[0])  # past the table: no page
    at = (page,) + (slice(None),) * (entry.ndim - 2) + (positions % size,)
    # Two advanced indices around slices: the update's (R, T) dimensions come first.
    return entry.at[at].set(jnp.moveaxis(values, -1, 1).astype(entry.dtype), mode="drop")


def write(entry, update: jnp.ndarray, table: jnp.ndarray, positions: jnp.ndarray):
    """``entry`` with the float keys or values ``update`` (R, H, D, T) stored (converted to its kind) at
    ``positions`` (R, T) through ``table`` (R, pages_per_row): one token per row per decode step, or a
    prompt piece (each row's own positions, so rows need not start together)."""
    return write_stored(entry, stored(entry, update), table, positions)


def gather(entry, table: jnp.ndarray, window: int):
    """The first ``window`` positions of the rows whose page tables are ``table`` (R, pages_per_row), as a
    contiguous whole-block cache entry (R, H, D, window) (or the int8 dict), in the stored kind."""
    if isinstance(entry, dict):
        return {name: gather(entry[name], table, window) for name in ("q", "scale")}
    size = entry.shape[-1]
    count = pages_for(window, size)
    rows = jnp.take(entry, table[:, :count], axis=0, mode="clip")  # (R, count, H, [D,] size)
    rows = jnp.moveaxis(rows, 1, -2)  # (R, H, [D,] count, size): position p at page p // size, offset p % size
    return rows.reshape(rows.shape[:-2] + (count * size,))[..., :window]


def attend(q: jnp.ndarray, keys, values, table: jnp.ndarray, positions: jnp.ndarray, window: int, dtype,
           kernel: bool = True) -> jnp.ndarray:
    """Causal attention of q (R, H, T, D) over the first ``window`` positions of the rows whose page tables
    are ``table`` (R, pages_per_row): each query sees positions <= its own (``positions`` (R, T)). The rows'
    pages are gathered into the whole-block layout and :func:`mvjax.nn.kv_cache.attend` computes what it
    computes for a whole-block cache holding the same values (``kernel`` as there). -> (R, H, T, D) in
    ``dtype``.

    A one-token float32 decode step lowered for ``cuda`` or ``tpu`` instead reads the pages in place through
    the paged Pallas kernel (:func:`mvjax.kernels.cache_attention.paged_step_attention`: only the pages each
    row has reached, no gather); on CPU (and anywhere else) the gather stays, so the CPU path computes
    exactly what the whole-block cache computes."""

    def gathered(q, keys, values, table, positions):
        return kv_cache.attend(q, gather(keys, table, window), gather(values, table, window), positions, window,
                               dtype, kernel=kernel)

    if not (kernel and q.shape[2] == 1 and jnp.dtype(q.dtype) == jnp.float32):
        return gathered(q, keys, values, table, positions)

    def in_place(q, keys, values, table, positions):
        scales = {}
        if isinstance(keys, dict):
            scales = {"key_scale": keys["scale"], "value_scale": values["scale"]}
            keys, values = keys["q"], values["q"]
        y = paged_step_attention(q[:, :, 0], keys, values, table, positions[:, 0], **scales)
        return y[:, :, None].astype(dtype)

    return jax.lax.platform_dependent(q, keys, values, table, positions, cpu=gathered, default=in_place)
