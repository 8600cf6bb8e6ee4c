"""The one place that runs chunks: plan -> first stage -> re-split -> second stage -> waveform -> delivery.

An :class:`Utterance` is one text: its planned pieces, speaker embedding, key, sampling and
decoder. :class:`Scheduler` takes utterances at any time (:meth:`Scheduler.add`) and works in
rounds (:meth:`Scheduler.step`):

1. **pick** chunks to start: one of every waiting utterance first (oldest first), spare room to
   more chunks of the same ones; a *streamed* utterance has one chunk in flight at a time, so its
   chunks come in order and its first one soonest;
2. **first stage**: through the continuous-batching engine (a chunk takes a slot as one frees up;
   one round is one engine call) or in static batches (the picked chunks decoded together);
3. **re-split**: a chunk that filled the first stage's block, or overflows the second's, goes
   back as two halves (up to :data:`~mvjax.inference.longform.MAX_RESPLITS` times);
4. **second stage and waveforms** for the chunks whose first stage is done, grouped by decoder:
   at once for a streamed utterance, otherwise once a batch is full or the first stage has
   nothing else to do (so batches stay full);
5. **delivery**: each utterance's planned chunks reach its ``deliver`` callback in order, a
   re-split chunk's pieces together.

A chunk draws from ``fold(utterance key, its index)`` (a half: ``fold(chunk key, half + 1)``), so
its tokens do not depend on what it was batched with. The library (:meth:`mvjax.TTS.synthesize`)
adds its texts and steps until :attr:`Scheduler.idle`; the server's worker adds requests as they
come, steps in its own thread and drops utterances whose client left (:meth:`Scheduler.drop`).
A scheduler is driven from one thread; ``lock`` (the server's) guards its bookkeeping against
readers in other threads. An utterance may stay *open* for text still arriving (the server's
WebSocket): :meth:`Scheduler.extend` adds planned pieces from another thread, :meth:`Scheduler.close_text`
says no more will come. (The module is long because rounds, re-splits, streaming and delivery share
one set of books.)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from mvjax.inference import keys as K
from mvjax.inference import longform
from mvjax.inference.decode import BlockFullWarning
from mvjax.inference.options import DECODERS, SamplingConfig, StreamSettings, SynthesisOptions
from mvjax.inference.stages import Batcher, Chunk, FirstStage, SecondStage, Timer, WaveDecoder

log = logging.getLogger("mvjax")


@dataclasses.dataclass(eq=False)
class Utterance:
    """One text for the scheduler. ``pieces``: its planned chunk texts (normalised); ``key``: its
    (2,) uint32 key; ``deliver(utterance, chunks)``: called with each planned chunk's pieces, in
    order, as they are ready (default: kept in :attr:`chunks`). ``open``: more pieces may still come
    (:meth:`Scheduler.extend`); it is not :attr:`done` until :meth:`Scheduler.close_text`."""

    pieces: Sequence[str]
    embedding: np.ndarray
    key: np.ndarray
    sampling: SamplingConfig = SamplingConfig()
    decoder: str = "mbd"
    stream: bool = False
    deliver: Optional[Callable[["Utterance", list[Chunk]], None]] = None
    streaming: Optional[StreamSettings] = None  # audio within a chunk as its frames are decoded
    on_piece: Optional[Callable[["Utterance", "Piece"], None]] = None  # such audio, as it is made
    index: int = 0  # its place in a batch of texts (warnings name it)
    text: str = ""  # the whole normalised text (for the caller)
    chunks: list = dataclasses.field(default_factory=list)  # delivered chunks (without ``deliver``)
    open: bool = False  # text still arriving: pieces may be added

    def __post_init__(self):
        self.embedding = np.asarray(self.embedding, np.float32)
        if self.open:
            self.pieces = list(self.pieces)
        self.todo = collections.deque(range(len(self.pieces)))  # planned chunks not yet started
        self.running = 0  # chunks started and not delivered (a re-split adds one per half)
        self.in_first = 0  # chunks in the first stage now
        self.parts: dict[int, list[Chunk]] = collections.defaultdict(list)  # index -> pieces done so far
        self.left: dict[int, int] = {}  # index -> pieces still being computed
        self.ready: dict[int, list[Chunk]] = {}  # finished planned chunks waiting for an earlier one
        self.next_index = 0
        self.dropped = False
        self.order = 0  # admission order (oldest first)

    @classmethod
    def seeded(cls, pieces: Sequence[str], embedding, seed: int, **fields) -> "Utterance":
        """One text on its own, keyed by ``seed`` as the library keys its first text (utterance id 0)."""
        return cls(pieces, embedding, K.keys_for(seed, [0])[0], **fields)

    @property
    def done(self) -> bool:
        return not self.open and self.next_index == len(self.pieces)


@dataclasses.dataclass
class Piece:
    """Audio of a chunk whose first stage is still running (streaming within a chunk). ``continues``:
    False for the chunk's first audio (joined to the previous chunk with the crossfade), True for
    the samples after it. ``codes``: the frames' codebooks (n_q, frames)."""

    chunk: Chunk
    wav: np.ndarray
    codes: np.ndarray
    continues: bool


@dataclasses.dataclass
class RoundStats:
    """What one round did (for metrics and logs)."""

    chunks: int  # chunks in the first stage this round (a static batch; the engine's occupied slots)
    utterances: int  # utterances they belong to
    tokens: int  # first-stage tokens generated
    stage1_seconds: float
    seconds: float
    started: int = 0  # chunks whose first stage started this round
    stream_seconds: float = 0.0  # streaming within chunks: second-stage passes and waveforms of partial frames


class Scheduler:
    """Runs the chunks of every added :class:`Utterance` through the three stages.

    ``options``: batching (``"engine"`` where the first stage allows it, else static),
    ``engine_steps``, ``max_new_tokens``, ``long_form`` (re-splits) and the second stage's sampling;
    ``sizes``: per-stage batch sizes (``{"stage1", "stage2", "decoder"}``, per device; the engine
    has ``stage1`` slots); ``room``: chunks a static round starts (None: every waiting chunk);
    ``timings``: seconds per stage are added there."""

    def __init__(self, stages: tuple[FirstStage, SecondStage, WaveDecoder], options: SynthesisOptions, sizes: dict,
                 room: Optional[int] = None, lock=None, timings: Optional[dict] = None):
        self.first, self.second, self.decoder = stages
        self.options, self.sizes, self.room = options, sizes, room
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.timings = timings if timings is not None else {}
        use_engine = options.batching == "engine"
        self.engine = self.first.engine(sizes["stage1"], options.engine_steps, options.paging) if use_engine else None
        if self.engine is not None:
            self.engine.reset()  # an engine (and its compiled code) is the model's: start it empty
        self.utterances: list[Utterance] = []
        self._resplit: list[Chunk] = []  # halves waiting for a static round
        self._finished: list[Chunk] = []  # first stage done, waiting for the second stage and decoding
        self._admitted = itertools.count()

    def batcher(self, stage: str) -> Batcher:
        return Batcher(self.sizes[stage], self.first.decoder.mesh, self.timings, self.options.progress)

    # --- utterances ---

    def add(self, utterance: Utterance) -> Utterance:
        with self.lock:
            utterance.order = next(self._admitted)
            self.utterances.append(utterance)
        return utterance

    def extend(self, utterance: Utterance, pieces: Sequence[str]) -> None:
        """Add planned ``pieces`` to an open utterance (from any thread; nothing once it is dropped)."""
        with self.lock:
            if not utterance.open:
                raise ValueError("only an open utterance takes more text")
            if utterance.dropped:
                return
            first = len(utterance.pieces)
            utterance.pieces.extend(pieces)
            utterance.todo.extend(range(first, len(utterance.pieces)))

    def close_text(self, utterance: Utterance) -> None:
        """No more pieces for ``utterance``: it is done once what it has is delivered (at once, with no
        chunks, when that already happened)."""
        with self.lock:
            if not utterance.open:
                return
            utterance.open = False
            if utterance.done and not utterance.dropped:
                if utterance in self.utterances:
                    self.utterances.remove(utterance)
                if utterance.deliver is not None:
                    utterance.deliver(utterance, [])

    def drop(self, utterance: Utterance) -> None:
        """Stop working on ``utterance``: its chunks not started never are, its chunks in the engine
        are cancelled and its finished ones are not decoded."""
        with self.lock:
            utterance.dropped = True
            utterance.todo.clear()
            utterance.running = 0
            if utterance in self.utterances:
                self.utterances.remove(utterance)
        if self.engine is not None:
            self.engine.cancel(lambda request: request.tag.owner is utterance)
        self._resplit = [c for c in self._resplit if c.owner is not utterance]
        self._finished = [c for c in self._finished if c.owner is not utterance]

    def reset(self) -> list[Utterance]:
        """After a failed round: forget all work in flight; returns the utterances that had some."""
        with self.lock:
            hit = [u for u in self.utterances if u.running]
            for u in hit:
                self.drop(u)
        if self.engine is not None:
            self.engine.reset()
        self._resplit, self._finished = [], []
        return hit

    @property
    def busy(self) -> bool:
        """Work started and not delivered (the next :meth:`step` continues it)."""
        return bool(self._resplit or self._finished or (self.engine is not None and not self.engine.idle))

    @property
    def idle(self) -> bool:
        return not self.busy and self.startable() == 0

    def startable(self) -> int:
        """Chunks that could start now (a streamed utterance offers one, none while one is in flight)."""
        with self.lock:
            return sum(min(len(u.todo), 1 if u.stream else len(u.todo)) for u in self.utterances
                       if not (u.stream and u.running))

    @property
    def waiting_chunks(self) -> int:
        with self.lock:
            return sum(len(u.todo) for u in self.utterances)

    def close(self) -> None:
        """Free the engine's cache (its compiled code stays with the model)."""
        if self.engine is not None:
            self.engine.reset()

    # --- one round ---

    def step(self) -> Optional[RoundStats]:
        """One round (see the module's docstring); None when there was nothing to do."""
        start = time.perf_counter()
        if self.engine is not None:
            picked = self._pick(self.engine.free_slots - len(self.engine.waiting))
            stats = self._engine_round(picked) if picked or not self.engine.idle else None
        else:
            picked = self._pick(None if self.room is None else max(0, self.room - len(self._resplit)))
            chunks, self._resplit = self._resplit + self._chunks(picked), []
            stats = self._static_round(chunks) if chunks else None
        self._tail()
        if stats is not None:
            stats.seconds = time.perf_counter() - start
        return stats

    def _pick(self, room: Optional[int]) -> list[tuple[Utterance, int]]:
        picked: list[tuple[Utterance, int]] = []
        with self.lock:
            pending = sorted((u for u in self.utterances if u.todo and not (u.stream and u.running)),
                             key=lambda u: u.order)
            while pending and (room is None or len(picked) < room):
                for u in list(pending):
                    if room is not None and len(picked) >= room:
                        break
                    index = u.todo.popleft()
                    picked.append((u, index))
                    u.running += 1
                    u.in_first += 1
                    u.left[index] = 1
                    if not u.todo or u.stream:
                        pending.remove(u)
        return picked

    def _chunks(self, picked: list[tuple[Utterance, int]]) -> list[Chunk]:
        return [self.chunk(u, (index,), u.pieces[index], K.fold(u.key, index)) for u, index in picked]

    def chunk(self, owner: Utterance, order: tuple, text: str, key) -> Chunk:
        """A chunk of ``owner`` with both stages' token ids."""
        return Chunk(owner, order, text, key, self.first.tokenizer.encode(text), self.second.tokenizer.encode(text))

    def _engine_round(self, picked: list[tuple[Utterance, int]]) -> RoundStats:
        engine = self.engine
        # Longest prompts first: they tend to run longest, so the tail of a run is short chunks.
        for c in sorted(self._chunks(picked), key=lambda c: -len(c.prompt)):
            engine.submit(self.first.request(c, self.options.max_new_tokens))
        start = time.perf_counter()
        with self.timer("stage1"):
            in_flight = [request.tag.owner for request, _ in engine.running.values()] + [
                r.tag.owner for r in list(engine.waiting)[: engine.free_slots]]
            results = engine.step()
        stage1 = time.perf_counter() - start
        for result in results:
            self._first_done(result.tag, self.first.result(result.tag, result.sequence, result.finished,
                                                           result.hit_block_end))
        start = time.perf_counter()
        self._stream_partials()
        return RoundStats(len(in_flight), len(set(map(id, in_flight))), engine.last_step_tokens, stage1, 0.0,
                          len(picked), stream_seconds=time.perf_counter() - start)

    def _static_round(self, chunks: list[Chunk]) -> RoundStats:
        start = time.perf_counter()
        with self.timer("stage1"):
            outs = self.first.run(chunks, self.options.max_new_tokens, self.batcher("stage1"))
        for c, out in zip(chunks, outs):
            self._first_done(c, out)
        return RoundStats(len(chunks), len({id(c.owner) for c in chunks}),
                          sum(out.report.generated_tokens for out in outs), time.perf_counter() - start, 0.0,
                          len(chunks))

    def timer(self, name: str) -> Timer:
        return Timer(self.timings, name)

    def _first_done(self, chunk: Chunk, out) -> None:
        """Record a chunk's first stage; an overflowing chunk goes back as two halves."""
        chunk.first_stage_codes, chunk.report = out
        owner = chunk.owner
        owner.in_first -= 1
        if owner.dropped:
            return
        halves = self._halves(chunk)
        if halves is None:
            self._finished.append(chunk)
            return
        with self.lock:
            owner.left[chunk.order[0]] += len(halves) - 1
            owner.running += len(halves) - 1
            owner.in_first += len(halves)
        if self.engine is not None:
            for half in halves:
                self.engine.submit(self.first.request(half, self.options.max_new_tokens))
        else:
            self._resplit += halves

    def _halves(self, chunk: Chunk) -> Optional[list[Chunk]]:
        """The two chunks to run instead of ``chunk`` when its first stage overflowed a block and it may
        still be split (long-form on, fewer than ``MAX_RESPLITS`` splits so far); else None."""
        overflow = chunk.report.hit_block_end or chunk.report.stage2_cut
        if not (overflow and self.options.long_form and len(chunk.order) - 1 < longform.MAX_RESPLITS):
            return None
        if chunk.emitted:  # its first audio is out: the rest is spoken as is (reported cut short)
            return None
        texts = longform.split_in_two(chunk.text)
        if len(texts) == 1:
            return None
        log.info("chunk of %d characters overflowed a block; splitting it in two", len(chunk.text))
        return [self.chunk(chunk.owner, chunk.order + (h,), t, K.fold(chunk.key, h + 1)) for h, t in enumerate(texts)]

    def _tail(self) -> None:
        """Second stage and waveforms for the chunks whose first stage is done, once a batch is full,
        the first stage has nothing else to do, or one of them may be delivered (a streamed
        utterance's, or one whose utterance has no other chunk left in the first stage): a
        finished chunk waits only while waiting costs its utterance nothing."""
        chunks = [c for c in self._finished if not c.owner.dropped]
        if not chunks:
            self._finished = []
            return
        first_stage_idle = not self._resplit and self.startable() == 0 and (self.engine is None or self.engine.idle)
        wanted = any(c.owner.stream or not (c.owner.todo or c.owner.in_first) for c in chunks)
        if not (first_stage_idle or wanted or len(chunks) >= self.sizes["stage2"]):
            return
        self._finished = []
        for c in chunks:
            if c.report.hit_block_end or c.report.stage2_cut:
                warnings.warn(f"text {c.owner.index + 1}: a chunk filled the model's block and its speech is cut short: "
                              f"{c.text[:60]!r}", BlockFullWarning, stacklevel=4)
        opts = self.options
        codebooks = self.second.run(chunks, opts.stage2_temperature, opts.stage2_top_k, self.batcher("stage2"))
        for c, codes in zip(chunks, codebooks):  # frames already sent keep the codes they were sent with
            c.all_codebooks = codes if c.played is None else np.concatenate([c.played, codes[:, c.emitted:]], axis=1)
        for decoder in DECODERS:
            group = [c for c in chunks if c.owner.decoder == decoder and not c.emitted]
            if group and self.decoder is not None:
                for c, wav in zip(group, self.decoder.run(group, decoder, self.batcher("decoder"))):
                    c.wav = wav
        for c in chunks:
            if c.emitted and self.decoder is not None:  # the rest of a streamed chunk: its last piece
                c.wav = self.decoder.stream(c, c.all_codebooks[:, c.emitted:], last=True)
            self._deliver(c)

    def _stream_partials(self) -> None:
        """Audio for the frames of streamed chunks still in the engine (see :class:`StreamSettings`):
        one second-stage pass over each due chunk's frames so far (batched), then the waveform of the
        frames at least ``lookahead`` behind the newest, through the decoder's carried state."""
        if self.engine is None or self.decoder is None:
            return

        def wanted(request) -> bool:
            c = request.tag
            u = c.owner
            return (u.streaming is not None and u.streaming.lookahead is not None and not u.dropped
                    and len(c.order) == 1 and c.order[0] == u.next_index and self.decoder.streams(u.decoder))

        due = []
        for request, sequence in self.engine.partial(wanted):
            chunk, plan = request.tag, request.tag.owner.streaming
            codes = self.first.codes(sequence)
            frames = min(codes.shape[1], self.second.room(chunk))
            upto = frames - plan.lookahead
            if upto - chunk.emitted >= plan.due(chunk.emitted):
                due.append((dataclasses.replace(chunk, first_stage_codes=codes[:, :frames]), chunk, upto))
        if not due:
            return
        opts = self.options
        codebooks = self.second.run([view for view, _, _ in due], opts.stage2_temperature, opts.stage2_top_k,
                                    self.batcher("stage2"))
        for (_, chunk, upto), books in zip(due, codebooks):
            codes = books[:, chunk.emitted:upto]
            wav = self.decoder.stream(chunk, codes, last=False)
            piece = Piece(chunk, wav, codes, continues=chunk.emitted > 0)
            chunk.played = codes if chunk.played is None else np.concatenate([chunk.played, codes], axis=1)
            chunk.emitted += codes.shape[1]
            with self.lock:
                if chunk.owner.on_piece is not None and not chunk.owner.dropped:
                    chunk.owner.on_piece(chunk.owner, piece)

    def _deliver(self, chunk: Chunk) -> None:
        """A chunk is done: once every piece of its planned chunk is, and every earlier planned chunk
        has been delivered, its owner gets them (in order)."""
        u, index = chunk.owner, chunk.order[0]
        with self.lock:
            if u.dropped:
                return
            u.parts[index].append(chunk)
            u.left[index] -= 1
            if u.left[index]:
                return
            u.ready[index] = sorted(u.parts.pop(index), key=lambda c: c.order)
            while u.next_index in u.ready:
                parts = u.ready.pop(u.next_index)
                u.running -= len(parts)
                u.next_index += 1  # ``done`` is true once the last planned chunk is handed over
                if u.done and u in self.utterances:
                    self.utterances.remove(u)
                if u.deliver is not None:
                    u.deliver(u, parts)
                else:
                    u.chunks += parts

    def run(self, utterances: Sequence[Utterance]) -> None:
        """Add ``utterances`` and step until every one is delivered (the library's way)."""
        for u in utterances:
            self.add(u)
        try:
            while not self.idle:
                self.step()
        except BaseException:
            self.reset()
            raise
        finally:
            self.close()
