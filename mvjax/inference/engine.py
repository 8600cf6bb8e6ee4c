"""Continuous batching for the first stage: a fixed set of slots sharing one KV cache.

A static batch (:meth:`FirstStageDecoder.generate`) decodes until its longest row ends, and a
request that arrives one step after it started waits for all of it. The engine instead keeps
``slots`` utterances in flight (each a guidance pair: a conditioned and an unconditioned cache
row) and works in rounds, JetStream style:

* **admit**: a waiting request takes a free slot. When no slot is decoding, its prompt is
  prefilled on its own (two rows, its prompt bucket, exactly the computation a batch of one does)
  and the resulting keys and values, first token, key, sampling values, limit and speaker
  embedding are written into the slot, all in one jitted call that updates the engine's state in
  place (donated buffers). When slots are decoding, a whole-prompt prefill would stall every one
  of them for its duration, so the prompt goes in piece by piece instead (``prefill_chunk``
  tokens, one request at a time): each decode step of the generate calls also runs the next piece
  in the same pass over the weights (the matrix products take the decode rows' tokens and the
  piece's together; attention is per group: the decode rows through the cache kernel, the piece
  over its own two cache rows, causal within the piece). After the last piece the slot's first
  token is sampled from the prompt's last position and the slot decodes from the next step on.
  The pieces compute what the whole-prompt prefill computes (same attention window; values equal
  up to float32 rounding, the products being compiled over other columns), and the tokens are the
  ones the request gets decoded alone (tested with pieces of 1 to 64 tokens);
* **generate**: every slot advances by up to ``steps`` tokens in one jitted call (a
  ``lax.while_loop``; while requests wait for a slot, the call ends as soon as one finishes).
  On CPU the attention kernel reads, for each row, only the positions that row has reached,
  so a call over every slot works on the whole cache in place; a call over fewer slots, or
  without the kernel, works on a copy of its rows' first positions, a static window just large
  enough for the longest slot (XLA's attention reads the whole window);
* **retire**: slots whose row produced end of audio or reached its limit hand back their tokens
  and become free for the next round.

Every slot carries its own key (token i drawn with ``fold_in(key, i)``, as the static decoder
does), guidance, temperature, top-k and top-p, so a request's tokens are the ones it gets
decoded alone with the same key, whatever it shared the slots with (tested). A slot's cache
rows keep stale values from earlier occupants beyond its current position; attention only reads
positions at or below a row's own, and each of those is rewritten before it is read.

**Pages** (``page_size``, ``pages``): instead of a block of positions per cache row, the slots share a pool
of ``pages`` pages of ``page_size`` positions per layer (:mod:`mvjax.nn.paged_cache`), and each row has a
page table (in the slot state; the host keeps the authoritative copy and decides who owns what). A request
gets pages as it grows: at admission, pages for what its prompt and first call write; before each generate
call, pages for what each running row's next ``steps`` tokens write; it hands them all back when it
retires or is cancelled. Memory then follows the tokens held rather than ``slots`` whole blocks, so
``slots`` can exceed what whole-block rows would fit in the same bytes. When pages run short:

* a waiting request is admitted (first in, first out) only while the free pages cover its prompt and
  first call plus ``page_reserve`` pages; otherwise it waits, like a request with no free slot;
* if the running rows' next call needs more pages than are free, the most recently admitted request is
  **preempted** (repeatedly, until the rest fit): its pages are freed, its tokens dropped, and it goes back
  to the front of the queue, to be prefilled and decoded again from its prompt once pages allow (never in
  the step that preempted it). As token i is drawn with ``fold_in(key, i)`` from the logits of the tokens
  before it, the re-decoded tokens are the ones it got before, and the ones it gets decoded alone, so a
  preemption costs only the recomputation (and the request's admission time is its re-admission; a
  :meth:`partial` reader sees its tokens start again from the prompt). The oldest request is never
  preempted and the pool holds at least one request's whole block, so every request finishes.

A page-table call reads and writes the pool in place whatever its rows and window: no window copy; the
window still bounds attention (each row's first ``window`` positions are gathered for XLA's attention, or
a paged attention kernel's read), and a compaction move only moves the page-table rows.

One engine runs on one device; over a mesh, :class:`mvjax.inference.engines.DeviceEngines`
runs one engine per device behind the same interface.

This module is long because the jitted functions that change the slots' state and the host
bookkeeping that decides which slot holds what (admission, compaction, windows, retirement) are
one state machine; split apart, each half would have to know the other's invariants.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mvjax.core.parallel import device_count
from mvjax.inference.decode import (
    FirstStageDecoder,
    LoopState,
    advance_rows,
    cache_windows,
    decode_step,
    next_pow2,
    prefill,
    prompt_bucket,
    sampling_columns,
)
from mvjax.inference.options import DEFAULT_STEPS, SamplingConfig
from mvjax.io.quantize import matrix_shape
from mvjax.nn.gpt_decode import apply_tokens, apply_with_piece
from mvjax.nn.kv_cache import (
    init_cache,
    put_rows,
    step_kernel_used,
    take_rows,
    window_part,
)
from mvjax.nn.paged_cache import empty_table, init_pages, pages_for, pages_per_row, write_stored

DEFAULT_SLOTS = 8
# Prompt tokens per decode step while a request is admitted next to running ones (None: whole prefill).
# Off by default: on this CPU pieces keep running streams' steps near their median but delay the admitted
# request's first token about 2x (benchmarks/RESULTS.md, "admission"), and the pieces' logits differ from
# a whole prefill's by float32 rounding (~2e-7), which could flip a sampling tie.
DEFAULT_PREFILL_CHUNK = None
IDLE_SAMPLING = SamplingConfig(guidance_scale=1.0, temperature=1.0, top_p=None)  # what a free slot holds


@dataclasses.dataclass
class EngineRequest:
    """One utterance (chunk) for the first stage. ``key``: its (2,) uint32 stage-1 key;
    ``speaker``: its (E,) embedding or None; ``tag``: anything the caller wants back."""

    prompt: Sequence[int]
    key: np.ndarray
    speaker: Optional[np.ndarray] = None
    sampling: SamplingConfig = SamplingConfig()
    max_new_tokens: Optional[int] = None
    tag: Any = None
    submitted: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class EngineResult:
    """A finished request: its prompt followed by the tokens generated (end of audio included
    when produced), and when it was admitted and retired (``time.monotonic``)."""

    request: EngineRequest
    sequence: np.ndarray
    prompt_length: int
    finished: bool  # produced end of audio
    hit_block_end: bool  # stopped because the block was full
    admitted: float
    retired: float

    @property
    def tag(self):
        return self.request.tag

    @property
    def generated(self) -> np.ndarray:
        return self.sequence[self.prompt_length:]


@flax.struct.dataclass
class SlotState:
    """Everything the slots carry on the device; the first six fields are those of a
    :class:`mvjax.inference.decode.LoopState` row."""

    tokens: jnp.ndarray  # (S, block) int32
    lengths: jnp.ndarray  # (S,) int32
    done: jnp.ndarray  # (S,) bool: finished, at its limit, or free
    finished: jnp.ndarray  # (S,) bool
    cache: list  # per layer (k, v), (2S, heads, head_dim, block): rows [conditioned..., unconditioned...]
    step_logits: Optional[jnp.ndarray]  # always None here
    prompt_lengths: jnp.ndarray  # (S,) int32
    limits: jnp.ndarray  # (S,) int32
    keys: jnp.ndarray  # (S, 2) uint32
    sampling: dict  # guidance, temperature, top_k, top_p: (S,) each
    speaker: Optional[jnp.ndarray]  # (S, E) float32, zeros where a request has none; None without speaker_proj
    # With pages: ``cache`` is the page pool (per layer (k, v), (pages, heads, head_dim, page_size)) and this
    # is each cache row's page table (2S, pages_per_row) int32, rows in the cache's order; None without pages.
    table: Optional[jnp.ndarray] = None


@dataclasses.dataclass
class _Prefill:
    """A request being admitted piece by piece: its slot, its prompt's length and bucket, the piece size,
    the attention window a whole-prompt prefill of that bucket uses, and where the next piece starts."""

    slot: int
    length: int
    piece: int
    window: int
    start: int = 0


class FirstStageEngine:
    """Continuous batching over ``slots`` utterances for one :class:`FirstStageDecoder`.

    Use :meth:`submit` and :meth:`step` (one admit + generate + retire round, returning the
    :class:`EngineResult` objects it finished) to serve arrivals as they come, or :meth:`run` for a
    fixed list. ``steps``: tokens per slot per jitted call; the shorter it is, the sooner a
    new request is admitted and a finished one handed back, at the price of more host round trips.
    ``prefill_chunk``: prompt tokens (a power of two) prefilled per decode step while a request is
    admitted next to decoding slots, so they never wait for a whole prefill; None or 0: every
    prompt is prefilled whole in its own call (the running slots wait for it).
    ``page_size``: hold the KV cache in pages of this many positions (see the module docstring), ``pages``
    of them in all (default: as many as ``slots`` whole blocks take, which saves nothing; give fewer), at
    least a whole block's worth for one request; ``page_reserve``: free pages an admission must leave for
    the running requests to grow into. None (default): a whole block per row, as before.
    """

    def __init__(self, decoder: FirstStageDecoder, slots: int = DEFAULT_SLOTS, steps: int = DEFAULT_STEPS,
                 prefill_chunk: Optional[int] = DEFAULT_PREFILL_CHUNK, device=None, page_size: Optional[int] = None,
                 pages: Optional[int] = None, page_reserve: int = 0):
        if slots < 1 or steps < 1:
            raise ValueError("the engine needs at least one slot and one step per call")
        if prefill_chunk and (prefill_chunk < 0 or prefill_chunk & (prefill_chunk - 1)):
            raise ValueError(f"prefill_chunk must be a power of two (or None), not {prefill_chunk}")
        if decoder.mesh is not None and device_count(decoder.mesh) > 1:
            raise ValueError("one FirstStageEngine runs on one device; over a mesh use "
                             "mvjax.inference.engines.DeviceEngines (one engine per device)")
        self.decoder = decoder
        self.device = device  # where the slots' state lives (None: the default device); the weights' device
        self.config = decoder.config
        self.slots = int(slots)
        self.steps = int(steps)
        self.prefill_chunk = int(prefill_chunk or 0)
        self.block_size = self.config.block_size
        self.windows = cache_windows(1, self.block_size)
        self.vocab = self.config.output_vocab_sizes[0]
        proj = decoder.params.get("speaker_proj")
        self.speaker_dim = None if proj is None else matrix_shape(proj)[1]
        self.compile_count = 0
        self.waiting: collections.deque[EngineRequest] = collections.deque()
        self.running: dict[int, tuple[EngineRequest, float]] = {}  # slot -> (request, admitted)
        self._lengths = np.zeros(self.slots, np.int64)  # host copy of each running slot's length (for the window)
        self._state: Optional[SlotState] = None
        self._prefill: Optional[_Prefill] = None  # the request being admitted piece by piece
        self._admit_fns: dict = {}
        self._generate_fns: dict = {}
        self._free = jax.jit(lambda state, mask: state.replace(done=state.done | mask), donate_argnums=(0,))
        self._move_fn = jax.jit(self._move, donate_argnums=(0,))
        self._reserve_fn = jax.jit(self._reserve, donate_argnums=(0,))
        self.last_step_tokens = 0  # tokens the last :meth:`step` generated, over all slots
        self.last_admitted = 0  # requests the last :meth:`step` admitted
        self.moves = 0  # requests moved down to a lower slot (compaction)
        # Totals over the engine's life: decode steps run, tokens they produced, and slot-steps
        # computed (each call's slots, busy or not, times its steps): see :attr:`row_use`.
        self.steps_run = 0
        self.tokens_generated = 0
        self.row_steps = 0
        self.page_size = int(page_size or 0)
        self.paged = self.page_size > 0
        self.preemptions = 0  # requests preempted for lack of pages (each re-decoded from its prompt)
        self.num_pages = self.pages_per_row = 0
        if self.paged:
            self.pages_per_row = pages_per_row(self.block_size, self.page_size)
            self.num_pages = int(pages) if pages else 2 * self.slots * self.pages_per_row
            if self.num_pages < 2 * self.pages_per_row:
                raise ValueError(f"a pool of {self.num_pages} pages cannot hold one request's two rows of "
                                 f"{self.pages_per_row} pages (the whole block): give at least "
                                 f"{2 * self.pages_per_row}")
            self.page_reserve = int(page_reserve)
        self._reset_pages()

    # --- the jitted pieces ---

    def _advance(self, prompt_lengths, limits, keys, sampling):
        return functools.partial(advance_rows, prompt_lengths=prompt_lengths, limits=limits, keys=keys,
                                 sampling=sampling, block_size=self.block_size,
                                 end_of_audio=self.decoder.end_of_audio)

    def _empty_state(self) -> SlotState:
        with jax.default_device(self.device) if self.device is not None else contextlib.nullcontext():
            return self._new_state()

    def _new_state(self) -> SlotState:
        s, block = self.slots, self.block_size
        return SlotState(
            tokens=jnp.zeros((s, block), jnp.int32),
            lengths=jnp.zeros((s,), jnp.int32),
            done=jnp.ones((s,), bool),
            finished=jnp.zeros((s,), bool),
            cache=(init_pages(self.config, self.num_pages, self.page_size, self.decoder.kv_cache) if self.paged
                   else init_cache(self.config, 2 * s, block, self.decoder.kv_cache)),
            step_logits=None,
            prompt_lengths=jnp.zeros((s,), jnp.int32),
            limits=jnp.zeros((s,), jnp.int32),
            keys=jnp.zeros((s, 2), jnp.uint32),
            sampling={name: jnp.asarray(values)
                      for name, values in sampling_columns([IDLE_SAMPLING] * s, self.vocab).items()},
            speaker=None if self.speaker_dim is None else jnp.zeros((s, self.speaker_dim), jnp.float32),
            table=jnp.asarray(empty_table(2 * s, self.pages_per_row, self.num_pages)) if self.paged else None,
        )

    def _admit_fn(self, plen: int):
        if plen not in self._admit_fns:
            self._admit_fns[plen] = jax.jit(functools.partial(self._admit_one, plen=plen), donate_argnums=(1,))
        return self._admit_fns[plen]

    def _admit_one(self, params, state: SlotState, prompt, prompt_length, limit, speaker, key, sampling, slot, *,
                   plen: int):
        """Prefill one request (prompt (1, plen)) as a batch of one would, then write it into ``slot``."""
        self.compile_count += 1  # runs only while tracing
        cfg, dtype = self.config, self.decoder.dtype
        window = cache_windows(plen, self.block_size)[0]
        small = init_cache(cfg, 2, window, self.decoder.kv_cache)
        rows = None if state.speaker is None else jnp.concatenate([speaker, jnp.zeros_like(speaker)], axis=0)

        def logits_fn(cache, tokens, positions, attend):
            return apply_tokens(cfg, params, tokens, positions, rows, cache, dtype, attend=attend)

        one = prefill(logits_fn, small, prompt, prompt_length, limit, window,
                      self._advance(prompt_length, limit, key, sampling), block_size=self.block_size)
        # The pair's rows [conditioned, unconditioned] land on cache rows slot and slots + slot (with pages:
        # the prompt bucket's positions, as stored, through those rows' page tables).
        if self.paged:
            pair = state.table[jnp.stack([slot, self.slots + slot])]
            at = jnp.broadcast_to(jnp.arange(plen, dtype=jnp.int32), (2, plen))
            part = jax.tree_util.tree_map(lambda a: a[..., :plen], one.cache)
            cache = jax.tree_util.tree_map(lambda pages, new: write_stored(pages, new, pair, at), state.cache, part,
                                           is_leaf=lambda a: isinstance(a, dict))
        else:
            cache = put_rows(state.cache, take_rows(one.cache, 0, 1), slot)
            cache = put_rows(cache, take_rows(one.cache, 1, 1), self.slots + slot)
        set_row = lambda whole, row: whole.at[slot].set(row[0])
        return state.replace(
            tokens=set_row(state.tokens, one.tokens), lengths=set_row(state.lengths, one.lengths),
            done=set_row(state.done, one.done), finished=set_row(state.finished, one.finished), cache=cache,
            prompt_lengths=set_row(state.prompt_lengths, prompt_length), limits=set_row(state.limits, limit),
            keys=set_row(state.keys, key),
            sampling={name: set_row(state.sampling[name], value) for name, value in sampling.items()},
            speaker=None if state.speaker is None else set_row(state.speaker, speaker),
        )

    def _reserve(self, state: SlotState, tokens, prompt_length, limit, speaker, key, sampling, slot) -> SlotState:
        """Slot ``slot`` set up for a piece-by-piece prefill: its values, and its tokens row (1, block) holding
        the prompt; it stays done (no decoding) until its last piece is in."""
        set_row = lambda whole, row: whole.at[slot].set(row[0])
        return state.replace(
            tokens=set_row(state.tokens, tokens), lengths=set_row(state.lengths, prompt_length),
            done=state.done.at[slot].set(True), finished=state.finished.at[slot].set(False),
            prompt_lengths=set_row(state.prompt_lengths, prompt_length), limits=set_row(state.limits, limit),
            keys=set_row(state.keys, key),
            sampling={name: set_row(state.sampling[name], value) for name, value in sampling.items()},
            speaker=None if state.speaker is None else set_row(state.speaker, speaker),
        )

    def _first_token(self, state: SlotState, logits, slot, now) -> SlotState:
        """Where ``now``: slot ``slot`` after its prefill, its first token sampled from ``logits`` (2, V) (its
        rows' last prompt position) as :func:`mvjax.inference.decode.prefill` samples a batch of one."""
        n, limit = state.prompt_lengths[slot][None], state.limits[slot][None]
        one = LoopState(tokens=state.tokens[slot][None], lengths=n, done=n >= limit, finished=jnp.zeros((1,), bool),
                        cache=None, step_logits=None)
        one = self._advance(n, limit, state.keys[slot][None],
                            {name: value[slot][None] for name, value in state.sampling.items()})(one, logits)
        put = lambda whole, row: whole.at[slot].set(jnp.where(now, row[0], whole[slot]))
        return state.replace(tokens=put(state.tokens, one.tokens), lengths=put(state.lengths, one.lengths),
                             done=put(state.done, one.done), finished=put(state.finished, one.finished))

    def _move(self, state: SlotState, source, target) -> SlotState:
        """Slot ``source``'s request moved to slot ``target`` (cache rows and per-slot values; with pages the
        host moves the page-table rows and the pool stays as it is)."""
        cache = state.cache
        if not self.paged:
            for half in (0, self.slots):
                cache = put_rows(cache, take_rows(cache, half + source, 1), half + target)
        moved = jax.tree_util.tree_map(lambda a: a.at[target].set(a[source]),
                                       state.replace(cache=None, step_logits=None, table=None))
        return moved.replace(cache=cache, table=state.table, done=moved.done.at[source].set(True))

    def _generate_fn(self, window: int, rows: int, piece: Optional[tuple[int, int]] = None):
        """The generate call over ``rows`` slots and ``window`` positions; ``piece``: (piece size, prefill
        window) of a call that also prefills a slot piece by piece, None for decoding only."""
        shape = (window, rows) if piece is None else (window, rows, piece)
        if shape not in self._generate_fns:
            fn = self._generate if piece is None else self._generate_with_prefill
            kw = {} if piece is None else {"piece": piece}
            self._generate_fns[shape] = jax.jit(functools.partial(fn, window=window, rows=rows, **kw),
                                                donate_argnums=(1,))
        return self._generate_fns[shape]

    def _generate_with_prefill(self, params, state: SlotState, hand_back, start, slot, *, window: int, rows: int,
                               piece: tuple[int, int]):
        """:meth:`_generate`, whose first steps also prefill slot ``slot`` (reserved by :meth:`_reserve`) one
        piece at a time from prompt position ``start``, until its prompt is in or the call's steps are
        used up. Returns the state and the position the next piece starts at."""
        return self._generate(params, state, hand_back, window=window, rows=rows, prefill=(start, slot, piece))

    def _generate(self, params, state: SlotState, hand_back, *, window: int, rows: int, prefill=None):
        """Up to ``steps`` tokens for slots ``0 .. rows - 1`` (every running slot lies there),
        attending to ``window`` cache positions. With ``hand_back`` (a request is waiting for a
        slot) the call also ends after the step in which a running slot finishes, so the slot is
        handed to the waiting request at once instead of idling until the call's last step. Unless
        that is the whole cache, the call works on a copy of those rows' first ``window``
        positions, made once and written back at the end: a lightly loaded engine steps as fast as
        a small batch, and no step reads a strided slice of a block-long cache (which XLA copies on
        every step)."""
        self.compile_count += 1  # runs only while tracing
        cfg, dtype = self.config, self.decoder.dtype
        whole = state
        cut = lambda a: a[:rows]
        table = None
        if self.paged:  # the whole pool, in place; the call's rows' page tables in its row layout
            table = jnp.concatenate([whole.table[:rows], whole.table[self.slots:self.slots + rows]])
            sliced = rows < self.slots
            if sliced:
                state = jax.tree_util.tree_map(cut, state.replace(cache=None, table=None)).replace(cache=whole.cache)
        else:
            sliced = rows < self.slots or window < self.block_size
            if sliced:
                state = jax.tree_util.tree_map(cut, state.replace(cache=None))
                state = state.replace(cache=window_part(self._pairs(whole.cache, rows), window))
        speaker_rows = None
        if state.speaker is not None:  # the decoder's row layout: [conditioned..., unconditioned...]
            speaker_rows = jnp.concatenate([state.speaker, jnp.zeros_like(state.speaker)], axis=0)
        advance = self._advance(state.prompt_lengths, state.limits, state.keys, state.sampling)
        idle_at_start = state.done

        def logits_fn(cache, tokens, positions, attend):
            return apply_tokens(cfg, params, tokens, positions, speaker_rows, cache, dtype, attend=attend,
                                table=table)

        def body(carry):
            i, st = carry
            return i + 1, decode_step(st, logits_fn, window, advance)

        def fits(st):
            next_write = jnp.where(st.done, 0, st.lengths - 1)
            return jnp.all(next_write < window)

        def more(carry):
            i, st = carry
            retired = jnp.any(st.done & ~idle_at_start)
            return (i < self.steps) & jnp.any(~st.done) & fits(st) & ~(hand_back & retired)

        start = steps_done = jnp.int32(0)
        if prefill is not None:
            start, slot, (size, prefill_window) = prefill
            length = state.prompt_lengths[slot]
            pair = (slot, rows + slot)  # the slot's conditioned and unconditioned cache rows in this call's layout
            row_ids = jnp.arange(rows)

            def piece_body(carry):
                i, start, st = carry
                # Decode rows as decode_step feeds them. The prefilling slot's pair writes its (ignored) step
                # after the piece, at the next piece's first position or, after the last piece, at the first
                # decode position: both are rewritten before anything reads them.
                last_pos = jnp.maximum(st.lengths - 1, 0).at[slot].set(jnp.minimum(start + size, length))
                tok = st.tokens[row_ids, last_pos]
                piece = jax.lax.dynamic_slice_in_dim(st.tokens[slot], start, size)
                logits, piece_logits, cache = apply_with_piece(
                    cfg, params, jnp.concatenate([tok, tok])[:, None], jnp.concatenate([last_pos, last_pos])[:, None],
                    speaker_rows, st.cache, jnp.stack([piece, piece]), start, pair,
                    None if st.speaker is None else st.speaker[slot], prefill_window,
                    jnp.clip(length - 1 - start, 0, size - 1), dtype, attend=window, table=table)
                st = advance(st.replace(cache=cache), logits[:, 0])
                return i + 1, start + size, self._first_token(st, piece_logits, slot, start + size >= length)

            def piece_more(carry):
                i, start, st = carry
                return (i < self.steps) & (start < length) & fits(st)

            steps_done, start, state = jax.lax.while_loop(piece_more, piece_body, (steps_done, start, state))
            # Requests waiting: end the call once this prefill is in, so the next admission starts.
            steps_done = jnp.where(hand_back, self.steps, steps_done)
        _, state = jax.lax.while_loop(more, body, (steps_done, state))
        if not sliced:
            return state if prefill is None else (state, start)
        if self.paged:
            cache = state.cache
        else:  # back in place: each half's rows, first ``window`` positions (put_rows writes a smaller block as is)
            cache = put_rows(whole.cache, take_rows(state.cache, 0, rows), 0)
            cache = put_rows(cache, take_rows(state.cache, rows, rows), self.slots)
        merged = jax.tree_util.tree_map(lambda a, part: a.at[:rows].set(part), whole.replace(cache=None, table=None),
                                        state.replace(cache=None, table=None))
        merged = merged.replace(cache=cache, table=whole.table)
        return merged if prefill is None else (merged, start)

    def _pairs(self, cache: list, rows: int) -> list:
        """The cache rows of slots ``0 .. rows - 1``: their conditioned rows, then their unconditioned ones."""
        return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), take_rows(cache, 0, rows),
                                      take_rows(cache, self.slots, rows))

    def _whole_cache(self, rows: int) -> bool:
        """Whether a call over ``rows`` slots runs on the whole cache rather than a window copy: a
        call over every slot when steps attend through a ragged kernel (:func:`step_kernel_used`: the
        CPU kernel, or a Pallas kernel on GPU/TPU), which reads only the positions each row has
        reached, so a window would only add a copy. Never with pages: their calls copy nothing, and the
        window bounds the positions gathered for attention."""
        return not self.paged and rows == self.slots and step_kernel_used(self.decoder.dtype, self.config.head_dim)

    # --- the host side ---

    @property
    def row_use(self) -> float:
        """Tokens generated per slot-step computed (1.0: no slot in a call ever sat idle); the
        prefill's first token of each request is not counted."""
        return self.tokens_generated / self.row_steps if self.row_steps else 0.0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.running)

    @property
    def free_pages(self) -> int:
        """Pages no request owns (0 without pages)."""
        return len(self._free_pages)

    @property
    def pages_in_use(self) -> int:
        """Pages the running requests own (0 without pages)."""
        return self.num_pages - len(self._free_pages) if self.paged else 0

    def reset(self) -> None:
        """Forget every waiting and running request (after an error mid-run) and free the cache."""
        self.waiting.clear()
        self.running.clear()
        self._prefill = None
        self._state = None
        self._reset_pages()

    # --- pages (host side) ---

    def _reset_pages(self) -> None:
        """Every page free, every row's table empty (also the whole-block engine's empty bookkeeping)."""
        self._free_pages: list[int] = list(range(self.num_pages - 1, -1, -1)) if self.paged else []
        width = self.pages_per_row if self.paged else 0
        self._table = empty_table(2 * self.slots, width, self.num_pages if self.paged else 0)
        self._owned = np.zeros(self.slots, np.int64)  # pages each row of a slot's pair owns (from position 0)
        self._limits = np.zeros(self.slots, np.int64)  # each running slot's total-length limit
        self._buckets = np.zeros(self.slots, np.int64)  # each running slot's prompt bucket
        self._order = np.zeros(self.slots, np.int64)  # admission order (the newest is preempted first)
        self._admissions = 0
        self._table_dirty = True
        self._preempted: set = set()  # ids of requests preempted in this step (not re-admitted in it)

    def _grow(self, slot: int, positions: int) -> bool:
        """Give slot ``slot``'s two rows pages for positions ``0 .. positions - 1``; False (nothing given) if
        the free pages do not cover it."""
        want = pages_for(min(positions, self.block_size), self.page_size) - int(self._owned[slot])
        if want <= 0:
            return True
        if 2 * want > len(self._free_pages):
            return False
        have = int(self._owned[slot])
        for row in (slot, self.slots + slot):
            for j in range(have, have + want):
                self._table[row, j] = self._free_pages.pop()
        self._owned[slot] = have + want
        self._table_dirty = True
        return True

    def _drop_pages(self, slot: int) -> None:
        """Slot ``slot``'s pages back to the pool."""
        if not self.paged:
            return
        have = int(self._owned[slot])
        for row in (slot, self.slots + slot):
            self._free_pages.extend(int(page) for page in self._table[row, :have])
            self._table[row] = self.num_pages
        self._owned[slot] = 0
        self._table_dirty = True

    def _first_positions(self, length: int, bucket: int, limit: int) -> int:
        """Positions a request's admission and first generate call write: its prompt bucket (the prefill,
        whole or in pieces), then up to ``steps`` tokens from its prompt's end."""
        return max(bucket, min(length + self.steps, limit))

    def _call_positions(self, slot: int) -> int:
        """Positions slot ``slot`` may write up to the end of the next generate call."""
        if self._prefill is not None and self._prefill.slot == slot:
            return self._first_positions(self._prefill.length, int(self._buckets[slot]), int(self._limits[slot]))
        # A row of length L writes positions L - 1 .. L + steps - 2 (its last token's, one per step).
        return min(int(self._lengths[slot]) + self.steps - 1, int(self._limits[slot]))

    def _pages_for_running(self) -> None:
        """Pages for every running row's next call, preempting the newest requests until they fit."""
        while True:
            short = sum(2 * max(0, pages_for(self._call_positions(slot), self.page_size) - int(self._owned[slot]))
                        for slot in self.running)
            if short <= len(self._free_pages) or len(self.running) == 1:
                break
            self._preempt(max(self.running, key=lambda slot: self._order[slot]))
        for slot in sorted(self.running, key=lambda slot: self._order[slot]):
            if not self._grow(slot, self._call_positions(slot)):  # only when one request outgrows the pool
                raise RuntimeError(f"{self.num_pages} pages cannot hold one request's next call")

    def _preempt(self, slot: int) -> None:
        """The request in ``slot`` stopped, its pages freed and its tokens dropped; back to the front of the
        queue (re-admitted from its prompt in a later step)."""
        mask = np.zeros(self.slots, bool)
        mask[slot] = True
        self._state = self._free(self._state, mask)
        request, _ = self.running.pop(slot)
        if self._prefill is not None and self._prefill.slot == slot:
            self._prefill = None
        self._drop_pages(slot)
        self.waiting.appendleft(request)
        self._preempted.add(id(request))
        self.preemptions += 1

    def _admissible(self, request: EngineRequest) -> bool:
        """Whether the free pages cover ``request``'s admission and first call (plus the reserve while others
        run); always True without pages."""
        if not self.paged:
            return True
        if id(request) in self._preempted:
            return False
        n = len(request.prompt)
        positions = self._first_positions(n, prompt_bucket(n, self.block_size), self._limit(request))
        reserve = self.page_reserve if self.running else 0
        return 2 * pages_for(positions, self.page_size) + reserve <= len(self._free_pages)

    def _limit(self, request: EngineRequest) -> int:
        """The total length (prompt and generated tokens) at which ``request`` stops."""
        new = self.block_size if request.max_new_tokens is None else request.max_new_tokens
        return min(len(request.prompt) + new, self.block_size)

    def _push_table(self) -> None:
        """The host's page tables into the slot state, if they changed since the last push."""
        if self.paged and self._table_dirty and self._state is not None:
            table = self._table.copy()
            table = jax.device_put(table, self.device) if self.device is not None else jnp.asarray(table)
            self._state = self._state.replace(table=table)
            self._table_dirty = False

    def cancel(self, predicate) -> int:
        """Drop every waiting or running request for which ``predicate(request)`` is true (a client
        that went away): their slots are free at the next step. Returns how many were dropped."""
        kept = collections.deque(r for r in self.waiting if not predicate(r))
        dropped = len(self.waiting) - len(kept)
        self.waiting = kept
        slots = [slot for slot, (request, _) in self.running.items() if predicate(request)]
        if slots:
            mask = np.zeros(self.slots, bool)
            mask[slots] = True
            self._state = self._free(self._state, mask)
            for slot in slots:
                del self.running[slot]
                self._drop_pages(slot)
                if self._prefill is not None and self._prefill.slot == slot:
                    self._prefill = None
        return dropped + len(slots)

    def release(self) -> None:
        """Free the slots' KV cache while the engine is idle (it is allocated again at the next admit)."""
        if self.idle:
            self._state = None

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; it takes a slot at the next :meth:`step` with one free."""
        self.check(request)
        self.waiting.append(request)

    def check(self, request: EngineRequest) -> None:
        """Raise ValueError for a request this engine cannot take."""
        prompt = np.asarray(request.prompt)
        if prompt.ndim != 1 or len(prompt) < 1:
            raise ValueError("every prompt needs at least one token")
        if len(prompt) >= self.block_size:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the block of {self.block_size}")
        if request.max_new_tokens is not None and request.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if (request.speaker is not None) and self.speaker_dim is None:
            raise ValueError("this model has no speaker projection: give no speaker embedding")

    def _admit(self, request: EngineRequest, slot: int, in_pieces: bool = False) -> None:
        """``request`` into ``slot``: prefilled whole now, or (``in_pieces``) reserved for a piece-by-piece
        prefill during the next generate calls."""
        if self._state is None:
            self._state = self._empty_state()
            self._table_dirty = True
        prompt = np.asarray(request.prompt, np.int32)
        n = len(prompt)
        plen = prompt_bucket(n, self.block_size)
        padded = np.zeros((1, plen), np.int32)
        padded[0, :n] = prompt
        limit = self._limit(request)
        if self.paged:
            self._limits[slot], self._buckets[slot] = limit, plen
            self._order[slot] = self._admissions
            self._admissions += 1
            if not self._grow(slot, self._first_positions(n, plen, limit)):  # _admissible checked it
                raise RuntimeError("admitted a request without the pages for it")
            self._push_table()
        sampling = sampling_columns([request.sampling], self.vocab)
        speaker = None
        if self.speaker_dim is not None:
            speaker = np.zeros((1, self.speaker_dim), np.float32)
            if request.speaker is not None:
                speaker[0] = np.asarray(request.speaker, np.float32).reshape(-1)
        key = np.asarray(request.key, np.uint32).reshape(1, 2)
        if in_pieces:
            row = np.zeros((1, self.block_size), np.int32)
            row[0, :n] = prompt
            self._state = self._reserve_fn(self._state, row, np.array([n], np.int32), np.array([limit], np.int32),
                                           speaker, key, sampling, np.int32(slot))
            self._prefill = _Prefill(slot, n, *self._piece_shape(plen))
            self.running[slot] = (request, time.monotonic())
            self._lengths[slot] = n
            return
        self._state = self._admit_fn(plen)(
            self.decoder.params, self._state, padded, np.array([n], np.int32), np.array([limit], np.int32),
            speaker, key, sampling, np.int32(slot))
        self.running[slot] = (request, time.monotonic())
        self._lengths[slot] = n + 1

    def _piece_shape(self, plen: int) -> tuple[int, int]:
        """(piece size, attention window) of a piece-by-piece prefill of a prompt in bucket ``plen``: pieces
        tile the bucket (both powers of two) and attend over the window a whole-prompt prefill of it uses."""
        return min(self.prefill_chunk, plen), cache_windows(plen, self.block_size)[0]

    def _window(self, rows: int) -> int:
        """The smallest window in which every running slot can take ``steps`` more tokens (and a slot being
        prefilled can take its pieces), or the whole block (:meth:`_whole_cache`)."""
        if self._whole_cache(rows):
            return self.block_size
        longest = max(int(self._lengths[s]) for s in self.running)
        need = longest + self.steps - 1  # the last write position of this call, plus one
        if self._prefill is not None:  # its pieces, and its first steps once they are in
            need = max(need, self._prefill.window, self._prefill.length + self.steps)
        return next((w for w in self.windows if w >= need), self.block_size)

    def precompile(self, max_prompt: int = 128, max_window: Optional[int] = None) -> int:
        """Compile ahead what serving will meet: the admit call of every prompt bucket up to
        ``max_prompt`` tokens, and the generate call of every (window up to ``max_window``, power-of-two
        rows) pair, with each piece shape of those buckets' piece-by-piece prefill too, by running
        each on idle slots (nothing is decoded). Only while idle. Returns the
        number of functions compiled."""
        if not self.idle:
            raise RuntimeError("precompile needs an idle engine")
        before = self.compile_count
        state = self._empty_state()
        key = np.zeros((1, 2), np.uint32)
        sampling = sampling_columns([IDLE_SAMPLING], self.vocab)
        speaker = None if self.speaker_dim is None else np.zeros((1, self.speaker_dim), np.float32)
        buckets = sorted({prompt_bucket(n, self.block_size) for n in range(1, min(max_prompt, self.block_size - 1) + 1)})
        for plen in buckets:  # a one-token prompt with a limit of two: the slot is done at once
            state = self._admit_fn(plen)(self.decoder.params, state, np.zeros((1, plen), np.int32),
                                         np.ones(1, np.int32), np.full(1, 2, np.int32), speaker, key, sampling,
                                         np.int32(0))
        state = self._move_fn(state, np.int32(min(1, self.slots - 1)), np.int32(0))
        if self.prefill_chunk:
            state = self._reserve_fn(state, np.zeros((1, self.block_size), np.int32), np.ones(1, np.int32),
                                     np.full(1, 2, np.int32), speaker, key, sampling, np.int32(0))
        pieces = sorted({self._piece_shape(plen) for plen in buckets}) if self.prefill_chunk else []
        rows = sorted({min(self.slots, 1 << i) for i in range(self.slots.bit_length() + 1)})
        shapes = {}  # (window, rows) of every call, in order: calls over the whole cache share one
        for window in self.windows:
            for r in rows:
                shapes[self.block_size if self._whole_cache(r) else window, r] = None
            if max_window is not None and window >= max_window:
                break
        for window, r in shapes:
            state = self._generate_fn(window, r)(self.decoder.params, state, np.bool_(False))
            for piece in pieces:  # a prefill of slot 0 whose prompt is already in (its loop runs no step)
                if piece[1] <= window:
                    state, _ = self._generate_fn(window, r, piece)(self.decoder.params, state, np.bool_(False),
                                                                   np.int32(1), np.int32(0))
        jax.block_until_ready(state.lengths)
        return self.compile_count - before

    def _compact(self) -> None:
        """Move running requests down into free slots so they all lie in the first power-of-two rows
        (a call computes only those); a move copies one slot's cache rows."""
        target = min(self.slots, next_pow2(len(self.running)))
        free = [slot for slot in range(target) if slot not in self.running]
        for source in sorted(slot for slot in self.running if slot >= target):
            dest = free.pop(0)
            self._state = self._move_fn(self._state, np.int32(source), np.int32(dest))
            self.running[dest] = self.running.pop(source)
            if self.paged:  # the pages stay where they are: the table rows move
                for half in (0, self.slots):
                    self._table[half + dest] = self._table[half + source]
                    self._table[half + source] = self.num_pages
                for per_slot in (self._owned, self._limits, self._buckets, self._order):
                    per_slot[dest] = per_slot[source]
                self._owned[source] = 0
                self._table_dirty = True
            if self._prefill is not None and self._prefill.slot == source:
                self._prefill.slot = dest
            self.moves += 1
            self._lengths[dest] = self._lengths[source]

    def step(self, others_waiting: bool = False) -> list[EngineResult]:
        """Admit waiting requests into free slots, run one generate call, retire finished slots.

        With ``prefill_chunk``, a request admitted while other slots decode is prefilled piece by
        piece inside the generate calls (one such request at a time; the others wait for it).
        ``others_waiting``: requests wait for a slot elsewhere (:class:`~mvjax.inference.engines.DeviceEngines`
        queues them until some engine frees one), so end the call as soon as a slot frees up."""
        admitted = 0
        self._preempted.clear()
        if self.paged and self.running:
            self._pages_for_running()  # before admitting: the running requests come first
        decoding = bool(self.running)  # slots that have produced tokens: an admission must not stall them
        for slot in range(self.slots):
            if not self.waiting or self._prefill is not None or not self._admissible(self.waiting[0]):
                break
            if slot not in self.running:
                if self.prefill_chunk and decoding:
                    self._admit(self.waiting.popleft(), slot, in_pieces=True)
                    break
                self._admit(self.waiting.popleft(), slot)
                admitted += 1  # its first token came from the prefill
        self.last_step_tokens = admitted
        self.last_admitted = admitted
        if not self.running:
            return []
        self._compact()
        rows = min(self.slots, next_pow2(max(self.running) + 1))
        # Requests still waiting: every slot is taken, so end the call as soon as one frees up; or a
        # request is being prefilled in pieces, so end it once that is done and admit the next.
        hand_back = np.bool_(bool(self.waiting) or others_waiting)
        window = self._window(rows)
        prefill = self._prefill
        self._push_table()
        if prefill is None:
            self._state = self._generate_fn(window, rows)(self.decoder.params, self._state, hand_back)
            start = None
        else:
            self._state, start = self._generate_fn(window, rows, (prefill.piece, prefill.window))(
                self.decoder.params, self._state, hand_back, np.int32(prefill.start), np.int32(prefill.slot))
        done, lengths, finished, start = jax.device_get(
            (self._state.done, self._state.lengths, self._state.finished, start))
        now = time.monotonic()
        results = []
        tokens = None
        grown = {slot: int(lengths[slot] - self._lengths[slot]) for slot in self.running}
        if prefill is not None:
            prefill.start = int(start)
            if prefill.start < prefill.length:  # still prefilling: not decoding yet
                del grown[prefill.slot]
            else:  # its first token came from the last piece
                self._prefill = None
                grown[prefill.slot] -= 1
                self.last_admitted += 1
                self.last_step_tokens += 1
        self.last_step_tokens += sum(grown.values())
        most = max(grown.values(), default=0)
        self.steps_run += most
        self.tokens_generated += sum(grown.values())
        self.row_steps += rows * most
        for slot in sorted(self.running):
            self._lengths[slot] = lengths[slot]
            if not done[slot] or slot == getattr(self._prefill, "slot", None):
                continue
            request, admitted = self.running.pop(slot)
            self._drop_pages(slot)
            n = int(lengths[slot])
            if tokens is None:  # one transfer of (slots, block) int32 for every slot retired this round
                tokens = np.asarray(jax.device_get(self._state.tokens))
            sequence = tokens[slot, :n].copy()
            results.append(EngineResult(
                request=request, sequence=sequence, prompt_length=len(request.prompt), finished=bool(finished[slot]),
                hit_block_end=bool(not finished[slot] and n >= self.block_size), admitted=admitted, retired=now))
        return results

    def partial(self, predicate) -> list[tuple[EngineRequest, np.ndarray]]:
        """(request, tokens so far: prompt then generated) for every running request for which
        ``predicate(request)`` is true: what a stream can already use of a request still decoding."""
        slots = [slot for slot, (request, _) in self.running.items() if predicate(request)]
        if not slots:
            return []
        tokens = np.asarray(jax.device_get(self._state.tokens))  # (slots, block) int32: one small transfer
        return [(self.running[slot][0], tokens[slot, : int(self._lengths[slot])].copy()) for slot in slots]

    def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        """Decode ``requests`` to the end; results in request order."""
        return run_to_end(self, requests)


def run_to_end(engine, requests: Sequence[EngineRequest]) -> list[EngineResult]:
    """Submit ``requests`` to ``engine`` (one engine or several) and step it until idle; results in
    request order. On any error the engine forgets its work (``reset``) before the error propagates."""
    for request in requests:
        engine.submit(request)
    order = {id(r): i for i, r in enumerate(requests)}
    out: list[Optional[EngineResult]] = [None] * len(requests)
    try:
        while not engine.idle:
            for result in engine.step():
                out[order[id(result.request)]] = result
    except BaseException:
        engine.reset()
        raise
    return out
