"""The paged KV cache (mvjax.nn.paged_cache) against the whole-block cache, and the engine with pages against the
whole-block engine and decoding each request alone (fixture model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvjax.nn import kv_cache, paged_cache
from mvjax.nn.config import GPTConfig

KINDS = ("float32", "bf16", "int8")
SMALL = GPTConfig(block_size=24, vocab_sizes=(10,), target_vocab_sizes=None, n_layer=2, n_head=2, n_embd=16)


def _pool_and_table(kind, size, rows, rng, spare=3):
    """A pool with room for ``rows`` whole rows plus ``spare`` pages, and a table handing the rows shuffled pages."""
    width = paged_cache.pages_per_row(SMALL.block_size, size)
    total = rows * width + spare
    table = rng.permutation(total)[: rows * width].reshape(rows, width).astype(np.int32)
    return paged_cache.init_pages(SMALL, total, size, kind)[0][0], table


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [4, 5])  # 5 divides neither the block (24) nor the piece (8)
def test_writes_through_the_table_read_back_as_the_whole_block_cache(kind, size):
    """A prompt piece for three rows, then one token per row at each row's own position: the gathered rows
    hold exactly the bytes the whole-block cache stores for the same writes (same conversion, same
    positions), and attention over them is the whole-block cache's attention, kernel or XLA."""
    rng = np.random.default_rng(0)
    rows, heads, dim, block = 3, SMALL.n_head, SMALL.head_dim, SMALL.block_size
    pages, table = _pool_and_table(kind, size, rows, rng)
    whole = kv_cache.init_cache(SMALL, rows, block, kind)[0][0]
    piece = jnp.asarray(rng.standard_normal((rows, heads, dim, 8)), jnp.float32)
    at = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (rows, 8))
    pages = paged_cache.write(pages, piece, jnp.asarray(table), at)
    whole = kv_cache.write(whole, piece, at)
    for step in range(3):  # rows at different positions, crossing page boundaries
        token = jnp.asarray(rng.standard_normal((rows, heads, dim, 1)), jnp.float32)
        at = jnp.asarray([[8 + step], [11 + step], [19 + step]], jnp.int32)
        pages = paged_cache.write(pages, token, jnp.asarray(table), at)
        whole = kv_cache.write(whole, token, at)
    got = paged_cache.gather(pages, jnp.asarray(table), block)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, whole)
    window = 23  # not a multiple of the page size: the gather cuts its last page
    q = jnp.asarray(rng.standard_normal((rows, heads, 1, dim)), jnp.float32)
    positions = jnp.asarray([[10], [13], [21]], jnp.int32)
    for kernel in (True, False):
        expected = kv_cache.attend(q, whole, whole, positions, window, jnp.float32, kernel=kernel)
        paged = paged_cache.attend(q, pages, pages, jnp.asarray(table), positions, window, jnp.float32, kernel=kernel)
        # Identical stored values in the same order through the same function: equal, not merely close.
        np.testing.assert_array_equal(np.asarray(paged), np.asarray(expected))


@pytest.mark.parametrize("kind", KINDS)
def test_writes_without_a_page_are_dropped_and_rows_keep_to_their_pages(kind):
    """Row 1 owns only its first page and row 2 none: their writes beyond what they own change nothing in the
    pool; row 0's writes touch only row 0's pages."""
    rng = np.random.default_rng(1)
    pages, table = _pool_and_table(kind, 4, 3, rng)
    total = paged_cache.num_pages([(pages, pages)])
    table[1, 1:] = total
    table[2, :] = total
    before = jax.tree_util.tree_map(np.asarray, pages)
    update = jnp.asarray(rng.standard_normal((3, SMALL.n_head, SMALL.head_dim, 1)), jnp.float32) + 1.0
    at = jnp.asarray([[5], [6], [0]], jnp.int32)  # row 1 at its second page (missing), row 2 anywhere
    after = paged_cache.write(pages, update, jnp.asarray(table), at)
    leaves = jax.tree_util.tree_leaves(after)
    touched = set()
    for old, new in zip(jax.tree_util.tree_leaves(before), leaves):
        changed = np.any((np.asarray(new) != old).reshape(old.shape[0], -1), axis=1)
        touched |= set(np.flatnonzero(changed).tolist())
    assert touched == {int(table[0, 1])}  # position 5 of row 0: its second page, nothing else


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_per_page_counts_every_layer(kind):
    pages = paged_cache.init_pages(SMALL, 7, 5, kind)
    held = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(pages))
    assert paged_cache.bytes_per_page(SMALL, 5, kind) * 7 == held
    assert paged_cache.pages_per_row(24, 5) == 5 and paged_cache.pages_for(10, 5) == 2
    assert paged_cache.pages_for(11, 5) == 3 and paged_cache.pages_for(0, 5) == 0
