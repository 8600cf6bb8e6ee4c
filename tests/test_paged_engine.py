"""The paged KV cache (mvjax.nn.paged_cache) against the whole-block cache, and the engine with pages against the
whole-block engine and decoding each request alone (fixture model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvjax.inference.decode import FirstStageDecoder
from mvjax.inference.engine import FirstStageEngine
from mvjax.io.checkpoint import load_gpt_stage
from mvjax.nn import kv_cache, paged_cache
from mvjax.nn.config import GPTConfig
from tests.test_engine import _alone, _requests

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


# --- the engine with pages -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(converted):
    config, params, tok = load_gpt_stage(converted, "first_stage")
    return FirstStageDecoder(config, params, end_of_audio=tok.offset - 1), tok


@pytest.fixture(scope="module")
def alone(model):
    """Each request's tokens decoded alone (static decoder, batch of one), per cache kind and seed, computed once."""
    dec, tok = model
    memo = {}

    def get(kind, seed):
        if (kind, seed) not in memo:
            one = dec.with_kv_cache(kind)
            memo[kind, seed] = [_alone(one, request)[0] for request in _requests(tok, seed)]
        return memo[kind, seed]

    return get


def _check_idle(engine):
    """Every page back in the pool, every table row empty."""
    assert engine.idle and engine.free_pages == engine.num_pages and engine.pages_in_use == 0
    assert np.all(engine._table == engine.num_pages) and not engine._owned.any()


def _run_recording(engine, requests):
    """Run to the end, recording per step (waiting, free slots, pages in use, running)."""
    for request in requests:
        engine.submit(request)
    results, trace = {}, []
    while not engine.idle:
        for result in engine.step():
            results[result.tag] = result
        trace.append((len(engine.waiting), engine.free_slots, engine.pages_in_use, len(engine.running)))
        assert len(trace) < 1000
    return [results[r.tag] for r in requests], trace


# Each engine test compiles the paged engine's calls (and most the whole-block engine's and the alone decodes
# too): 30-70 s each on two shared cores, so the default suite keeps only the waiting-for-pages one.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind,page_size,chunk", [
    pytest.param("float32", 12, 4, marks=_SLOW),
    pytest.param("float32", 16, None, marks=_SLOW),
    pytest.param("bf16", 16, None, marks=_SLOW),
    pytest.param("bf16", 12, 4, marks=_SLOW),
    pytest.param("int8", 16, None, marks=_SLOW),
    pytest.param("int8", 12, 4, marks=_SLOW),
])
def test_paged_engine_tokens_equal_whole_block_engine_and_alone(model, alone, kind, page_size, chunk):
    """Seven requests (own prompts, speakers, sampling, limits) through three slots: with pages of 16 positions
    (they divide the prompt buckets 16/32/64) and whole prefills, and of 12 (they divide none) with prompts
    prefilled in pieces of 4 next to decoding slots, every request's tokens are the whole-block engine's and
    its tokens decoded alone, for each cache kind (the pages hold the same stored values at the same
    positions, and attention reads them in the same order); afterwards every page is back in the pool."""
    dec, tok = model
    dec = dec.with_kv_cache(kind)
    whole = FirstStageEngine(dec, slots=3, steps=5, prefill_chunk=chunk).run(_requests(tok))
    # A pool for 1.5 whole blocks' pairs: smaller than the three slots' whole blocks, so pages are shared.
    width = paged_cache.pages_per_row(dec.config.block_size, page_size)
    engine = FirstStageEngine(dec, slots=3, steps=5, prefill_chunk=chunk, page_size=page_size, pages=3 * width)
    results, trace = _run_recording(engine, _requests(tok))
    for request, got, ref, expected in zip(_requests(tok), results, whole, alone(kind, 5)):
        np.testing.assert_array_equal(got.sequence, expected, err_msg=f"request {request.tag}")
        np.testing.assert_array_equal(got.sequence, ref.sequence, err_msg=f"request {request.tag}")
        assert got.finished == ref.finished
    assert max(running for *_, running in trace) == 3
    _check_idle(engine)


@pytest.mark.parametrize("page_size", [5, pytest.param(16, marks=_SLOW)])
def test_a_pool_too_small_for_every_request_makes_them_wait_for_pages(model, alone, page_size):
    """Seven slots but a pool of one whole block's pair: requests wait for pages while slots are free, the
    pages in use never exceed the pool, nothing is preempted (the reserve leaves the running requests room
    to grow to their limits here) and every request's tokens are its tokens decoded alone."""
    dec, tok = model
    width = paged_cache.pages_per_row(dec.config.block_size, page_size)
    # The longest request here holds 22 + 60 positions: 2 * ceil(82 / size) pages at its end.
    reserve = 2 * paged_cache.pages_for(82, page_size)
    engine = FirstStageEngine(dec, slots=7, steps=6, page_size=page_size, pages=2 * width, page_reserve=reserve)
    results, trace = _run_recording(engine, _requests(tok))
    assert any(waiting and free for waiting, free, _, _ in trace)  # waited for pages, not for a slot
    assert max(used for _, _, used, _ in trace) <= engine.num_pages and engine.preemptions == 0
    for request, got, expected in zip(_requests(tok), results, alone("float32", 5)):
        np.testing.assert_array_equal(got.sequence, expected, err_msg=f"request {request.tag}")
    _check_idle(engine)


@_SLOW
def test_running_out_of_pages_preempts_the_newest_request_which_decodes_again(model, alone):
    """Seven short prompts all admitted at once (their first calls fit the pool of one whole block's pair),
    then their growth outruns the pool: the newest requests are preempted, queued again and re-decoded from
    their prompts, and come out with their tokens decoded alone (each token is drawn with its own key from the
    tokens before it); the oldest is never preempted."""
    dec, tok = model
    width = paged_cache.pages_per_row(dec.config.block_size, 16)
    engine = FirstStageEngine(dec, slots=7, steps=6, page_size=16, pages=2 * width)
    requests = _requests(tok, seed=8)
    preempted = []
    original = engine._preempt

    def spy(slot):
        preempted.append(engine.running[slot][0].tag)
        original(slot)

    engine._preempt = spy
    results, trace = _run_recording(engine, requests)
    assert trace[0][3] == 7 and engine.preemptions >= 1 and 0 not in preempted
    for request, got, expected in zip(requests, results, alone("float32", 8)):
        np.testing.assert_array_equal(got.sequence, expected, err_msg=f"request {request.tag}")
    _check_idle(engine)


@_SLOW
def test_moves_cancel_and_precompile_with_pages(model, alone):
    """Compaction moves only page-table rows (tokens unchanged); a cancelled request's pages go back at once;
    after ``precompile`` a paged run compiles nothing new."""
    dec, tok = model
    requests = _requests(tok, seed=13)[:4]
    for request, new in zip(requests, [4, 30, 4, 30]):
        request.max_new_tokens = new
    engine = FirstStageEngine(dec, slots=4, steps=3, page_size=8, pages=80)
    compiled = engine.precompile(max_prompt=64, max_window=128)
    assert compiled > 0
    results, _ = _run_recording(engine, requests)
    assert engine.moves >= 1 and engine.compile_count == compiled
    for request, got in zip(requests, results):
        np.testing.assert_array_equal(got.sequence, _alone(dec, request)[0])
    _check_idle(engine)

    for request in _requests(tok, seed=5)[:3]:
        engine.submit(request)
    engine.step()
    owned = {slot: 2 * int(engine._owned[slot]) for slot in engine.running}
    free = engine.free_pages
    assert engine.cancel(lambda r: r.tag == 1) == 1
    assert engine.free_pages == free + owned[1] and 1 not in [r.tag for r, _ in engine.running.values()]
    rest = {}
    while not engine.idle:
        rest.update({r.tag: r for r in engine.step()})
    for tag in (0, 2):
        np.testing.assert_array_equal(rest[tag].sequence, alone("float32", 5)[tag])
    _check_idle(engine)


def test_bad_page_settings(model):
    dec, _ = model
    width = paged_cache.pages_per_row(dec.config.block_size, 16)
    with pytest.raises(ValueError, match="cannot hold one request"):
        FirstStageEngine(dec, slots=2, page_size=16, pages=2 * width - 1)
    engine = FirstStageEngine(dec, slots=2, page_size=16)
    assert engine.num_pages == 2 * 2 * width and engine.free_pages == engine.num_pages
