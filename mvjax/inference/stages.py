"""The model's three stages as objects that take chunks and return their results.

A :class:`Chunk` is one piece of one text on its way through the model. :class:`FirstStage`
(codebooks 1-2: static batches or the continuous-batching engine), :class:`SecondStage`
(codebooks 3-8) and :class:`WaveDecoder` (EnCodec latent -> multi-band diffusion or the plain
codec) each own their model and token layout, group the chunks they are given into batches
(sorted by length, so similar lengths share a padded shape and a compiled program; padded to a
power of two rows and a multiple of the device count) and return one result per chunk, in the
order given. Nothing depends on how many chunks share a batch: each chunk draws from its own
key (:mod:`mvjax.inference.keys`). :mod:`mvjax.inference.scheduler` decides what runs when.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any, Iterable, NamedTuple, Optional

import jax
import numpy as np
from tqdm import tqdm

from mvjax.core.parallel import device_count, pad_rows, padded_size, put_batch, put_replicated
from mvjax.inference import keys as K
from mvjax.inference.decode import BlockFullWarning, FirstStageDecoder, next_pow2
from mvjax.inference.diffusion import re_eq
from mvjax.inference.diffusion_stream import DiffusionStream, RowNoise, WindowSettings
from mvjax.inference.engine import EngineRequest, FirstStageEngine
from mvjax.inference.engines import DeviceEngines
from mvjax.inference.options import DECODERS, SamplingConfig, SynthesisError
from mvjax.inference.second_stage import SecondStageSampler
from mvjax.inference.speech import ChunkReport
from mvjax.inference.throughput import diffusion_bytes_per_row, memory_pools, rows_that_fit
from mvjax.nn import encodec
from mvjax.text.layout import (
    TokenLayout,
    build_second_stage_input,
    second_stage_codebooks,
    split_first_stage_tokens,
)

log = logging.getLogger("mvjax")
# One line per chunk, at DEBUG (a server logs one INFO line per request; the synthesize CLI shows these).
chunk_log = logging.getLogger("mvjax.chunks")


@dataclasses.dataclass(eq=False)
class Chunk:
    """One piece of a text. ``owner``: the :class:`~mvjax.inference.scheduler.Utterance` it belongs to
    (its speaker embedding, sampling and decoder); ``order``: its position there (a re-split
    chunk's halves extend it); ``prompt``/``stage2_text``: the text's ids for each stage."""

    owner: Any
    order: tuple
    text: str
    key: np.ndarray  # (2,) uint32
    prompt: list
    stage2_text: list
    first_stage_codes: Optional[np.ndarray] = None
    report: Optional[ChunkReport] = None
    all_codebooks: Optional[np.ndarray] = None
    wav: Optional[np.ndarray] = None  # (channels, samples); for a streamed chunk, the samples not yet sent
    emitted: int = 0  # frames whose audio was sent while the first stage ran (streaming within a chunk)
    played: Optional[np.ndarray] = None  # their codebooks (n_q, emitted)
    stream_state: Any = None  # the waveform decoder's carried state for those frames

    @property
    def embedding(self) -> np.ndarray:
        return self.owner.embedding

    @property
    def sampling(self) -> SamplingConfig:
        return self.owner.sampling


class FirstStageOut(NamedTuple):
    codes: np.ndarray  # (2, frames) codebooks 1-2
    report: ChunkReport


class Timer:
    """Adds the wall time of a ``with`` block to ``timings[name]``."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start


def diffusion_frames_bucket(frames: int) -> int:
    """Padded frame count for batched decoding: powers of two up to 256, then multiples of 256."""
    if frames <= 256:
        return max(16, next_pow2(frames))
    return -(-frames // 256) * 256


@dataclasses.dataclass(frozen=True)
class Batcher:
    """How a stage batches: ``size`` chunks per device per call over ``mesh``; ``timings`` collects
    each stage's seconds; ``progress`` counts chunks done on a terminal."""

    size: int
    mesh: object = None
    timings: dict = dataclasses.field(default_factory=dict)
    progress: bool = False

    def batches(self, items: list, desc: str) -> Iterable[list]:
        per_call = max(1, self.size) * (device_count(self.mesh) if self.mesh is not None else 1)
        groups = [items[i : i + per_call] for i in range(0, len(items), per_call)]
        if not (self.progress and groups):
            return groups
        return _counted(groups, len(items), desc)

    def timer(self, name: str) -> Timer:
        return Timer(self.timings, name)


def _counted(groups: list[list], total: int, desc: str):
    """Yield ``groups`` while a terminal bar counts chunks done of ``total``, with rate and ETA."""
    with tqdm(total=total, desc=desc, unit="chunk", leave=False, dynamic_ncols=True) as bar:
        for group in groups:
            yield group
            bar.update(len(group))


class FirstStage:
    """Codebooks 1-2 for chunks: :meth:`run` in static batches, or through the continuous-batching
    :meth:`engine` (:meth:`request` in, :meth:`result` out). ``stage2_block``: the second stage's
    block, which bounds the frames a chunk can keep."""

    def __init__(self, decoder: FirstStageDecoder, tokenizer, layout: TokenLayout, stage2_block: int):
        self.decoder, self.tokenizer, self.layout, self.stage2_block = decoder, tokenizer, layout, stage2_block
        self._engines: dict = {}

    def engine(self, slots: int, steps: int, paging: Optional[tuple[int, int]] = None):
        """The engine with ``slots`` slots (per device) and ``steps`` tokens per call, kept with its
        compiled functions for the next synthesis: a :class:`FirstStageEngine` on one device, a
        :class:`~mvjax.inference.engines.DeviceEngines` (one engine per device) over a mesh.
        ``paging``: ``(page_size, pages per device)`` for a paged KV cache (None: whole blocks)."""
        key = (int(slots), int(steps), paging)
        if key not in self._engines:
            pages = {} if paging is None else {"page_size": paging[0], "pages": paging[1]}
            try:
                if self.decoder.mesh is not None and device_count(self.decoder.mesh) > 1:
                    self._engines[key] = DeviceEngines(self.decoder, slots=slots, steps=steps, **pages)
                else:
                    self._engines[key] = FirstStageEngine(self.decoder, slots=slots, steps=steps, **pages)
            except ValueError as exc:  # a pool too small for one request's block
                raise SynthesisError(str(exc), "kv_pages") from None
        return self._engines[key]

    def run(self, chunks: list[Chunk], max_new_tokens: Optional[int], batcher: Batcher) -> list[FirstStageOut]:
        """Every chunk through static batches (shortest prompts first); results in ``chunks``' order."""
        out: dict[int, FirstStageOut] = {}
        ordered = sorted(chunks, key=lambda c: len(c.prompt))
        for batch in batcher.batches(ordered, "stage 1"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BlockFullWarning)  # reported per chunk by the scheduler
                result = self.decoder.generate(
                    [c.prompt for c in batch], np.stack([c.embedding for c in batch]),
                    np.stack([K.fold(c.key, K.STAGE1) for c in batch]), [c.sampling for c in batch],
                    max_new_tokens=max_new_tokens, pad_to=next_pow2(len(batch)),
                )
            for i, c in enumerate(batch):
                out[id(c)] = self.result(c, result.sequences[i], bool(result.finished[i]),
                                         bool(result.hit_block_end[i]))
        return [out[id(c)] for c in chunks]

    def codes(self, sequence: np.ndarray) -> np.ndarray:
        """Codebooks 1-2 (2, frames) of a first-stage sequence, finished or not."""
        return split_first_stage_tokens(sequence, self.layout.codebook_size)[1]

    def request(self, chunk: Chunk, max_new_tokens: Optional[int]) -> EngineRequest:
        """The engine request for ``chunk`` (which rides along as its tag)."""
        return EngineRequest(chunk.prompt, K.fold(chunk.key, K.STAGE1), chunk.embedding, chunk.sampling,
                             max_new_tokens, tag=chunk)

    def result(self, chunk: Chunk, sequence: np.ndarray, finished: bool, hit_block_end: bool) -> FirstStageOut:
        """A chunk's codes and report from its first-stage sequence (prompt then generated tokens)."""
        _, codes = split_first_stage_tokens(sequence, self.layout.codebook_size)
        frames = codes.shape[1]
        room = self.stage2_block - len(chunk.stage2_text) - 1
        report = ChunkReport(
            text=chunk.text, prompt_tokens=len(chunk.prompt), generated_tokens=int(len(sequence) - len(chunk.prompt)),
            frames=min(frames, max(room, 0)), finished=finished, hit_block_end=hit_block_end, stage2_cut=frames > room,
        )
        chunk_log.debug("chunk %r: %d prompt tokens, %d generated, %d frames%s", chunk.text[:40], report.prompt_tokens,
                        report.generated_tokens, frames, " (block full)" if report.hit_block_end else "")
        return FirstStageOut(codes, report)


class SecondStage:
    """Codebooks 3-8 for every frame of chunks whose first stage is done."""

    MIN_WINDOW = 16  # positions: fewer window shapes to compile

    def __init__(self, sampler: SecondStageSampler, tokenizer, layout: TokenLayout, block_size: int):
        self.sampler, self.tokenizer, self.layout, self.block_size = sampler, tokenizer, layout, block_size

    def room(self, chunk: Chunk) -> int:
        """Frames of ``chunk`` the block holds after its text (and the closing pad)."""
        return max(self.block_size - len(chunk.stage2_text) - 1, 0)

    def run(self, chunks: list[Chunk], temperature: float, top_k: Optional[int], batcher: Batcher) -> list[np.ndarray]:
        """All codebooks, (n_q, frames), per chunk, in ``chunks``' order; codebooks 3-8 only from each
        chunk's first frame not yet sent (``emitted``; the frames before hold the pad id). The second
        stage sees the whole block (text, frames, pads) and draws each position from the chunk's
        stage-2 key, so a pass over a chunk's first frames draws those frames from the same numbers
        as the pass over all of them; only the positions wanted are sampled (a window of a power of
        two positions, at least :data:`MIN_WINDOW`)."""
        out = []
        with batcher.timer("stage2"):
            for batch in batcher.batches(chunks, "stage 2"):
                inputs = np.stack([build_second_stage_input(c.stage2_text, c.first_stage_codes, self.block_size,
                                                            self.layout.stage2_pad) for c in batch])
                keys = np.stack([K.fold(c.key, K.STAGE2) for c in batch])
                pad = next_pow2(len(batch))
                starts = np.array([len(c.stage2_text) + c.emitted for c in batch])
                wanted = max(min(c.first_stage_codes.shape[1], self.room(c)) - c.emitted for c in batch)
                window = (pad_rows(starts, pad), next_pow2(max(wanted, self.MIN_WINDOW)))
                predicted = self.sampler.sample(pad_rows(inputs, pad), pad_rows(np.stack([c.embedding for c in batch]), pad),
                                                pad_rows(keys, pad), temperature=temperature, top_k=top_k, window=window)
                out += [second_stage_codebooks(inputs[i], predicted[i], len(c.stage2_text), c.first_stage_codes.shape[1])
                        for i, c in enumerate(batch)]
        return out


class Codec:
    """The EnCodec decoder of a model: codes -> (latent, waveform), jitted once, split over ``mesh``."""

    def __init__(self, config, params, mesh=None):
        self.config, self.mesh = config, mesh
        self.params = put_replicated(params, mesh)
        self._decode_latent = jax.jit(lambda p, latent: encodec.decode_latent(config, p, latent))

    streams = True  # causal: decoded a few frames at a time with carried state, same samples
    STREAM_PIECE = 8  # frames per incremental decoder call (one compiled program per phase)

    def stream_start(self) -> encodec.StreamingDecoder:
        """A new one-row incremental decoding (its state is carried from piece to piece)."""
        return encodec.StreamingDecoder(self.config, self.params, 1, piece_frames=self.STREAM_PIECE)

    def stream_step(self, state: encodec.StreamingDecoder, codes: np.ndarray, last: bool):
        """The next frames' codes (n_q, frames) through the stream ``state`` (advanced in place):
        (their latent (D, frames), the waveform samples now final (channels, samples))."""
        latent = encodec.codes_to_latent(self.params, np.asarray(codes)[None])
        return np.asarray(latent)[0], np.asarray(state.push(latent, last=last))[0].astype(np.float32)

    def decode(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """codes (B, n_q, F) -> (latent (B, D, F), waveform (B, channels, F * hop)), numpy."""
        latent = np.asarray(encodec.codes_to_latent(self.params, codes))
        return latent, np.asarray(self._decode_latent(self.params, put_batch(latent, self.mesh)))


@dataclasses.dataclass(eq=False)
class _WaveStream:
    """A streamed chunk's waveform decoding: the codec's carried state and, for ``"mbd"``, the
    diffusion windows with the latent frames whose codec samples have not come out yet."""

    codec: Any
    diffusion: Optional[DiffusionStream] = None
    latent: Optional[np.ndarray] = None  # (D, frames) waiting for their codec samples
    wav: Optional[np.ndarray] = None  # (channels, samples) codec samples of frames not yet diffused

    def diffuse(self, latent: np.ndarray, wav: np.ndarray, hop: int, last: bool) -> np.ndarray:
        self.latent = latent if self.latent is None else np.concatenate([self.latent, latent], axis=1)
        self.wav = wav if self.wav is None else np.concatenate([self.wav, wav], axis=1)
        ready = self.latent.shape[1] if last else min(self.latent.shape[1], self.wav.shape[1] // hop)
        out = self.diffusion.push(self.latent[:, :ready], self.wav[:, : ready * hop])
        self.latent, self.wav = self.latent[:, ready:], self.wav[:, ready * hop :]
        return np.concatenate([out, self.diffusion.finish()], axis=1) if last else out


class WaveDecoder:
    """Waveforms from all codebooks: the codec's latent through multi-band diffusion (``"mbd"``, then
    matched to the plain decoding's spectrum) or the plain codec (``"encodec"``). ``diffusion``: a
    callable returning the :class:`~mvjax.inference.diffusion.MultiBandDiffusion` (built on first use)."""

    def __init__(self, codec: Codec, diffusion):
        self.codec, self._diffusion = codec, diffusion

    def streams(self, decoder: str) -> bool:
        """Whether ``decoder`` can make a chunk's audio a few frames at a time (:meth:`stream`): the codec
        always (it is causal); diffusion in windows over the codec's stream
        (:mod:`~mvjax.inference.diffusion_stream`)."""
        return decoder in DECODERS and self.codec.streams

    def stream(self, chunk: Chunk, codes: np.ndarray, last: bool) -> np.ndarray:
        """The waveform (channels, samples) of ``codes`` (n_q, frames): the frames after those of
        ``chunk`` already decoded, its decoder state carried on the chunk; ``last``: the chunk ends
        here (the state's held samples come out too). With ``"mbd"`` the samples lag further: a
        diffusion window runs once its frames and lookahead have arrived from the codec."""
        state = chunk.stream_state
        if state is None:
            diffusion = None
            if chunk.owner.decoder == "mbd":
                mbd, hop = self._diffusion(), self.codec.config.hop_length
                noise = RowNoise(mbd, K.fold(chunk.key, K.DIFFUSION), self.codec.config.channels)
                diffusion = DiffusionStream(mbd, noise, WindowSettings(), hop)
            state = chunk.stream_state = _WaveStream(self.codec.stream_start(), diffusion)
        latent, wav = self.codec.stream_step(state.codec, codes, last)
        return wav if state.diffusion is None else state.diffuse(latent, wav, self.codec.config.hop_length, last)

    def run(self, chunks: list[Chunk], decoder: str, batcher: Batcher) -> list[np.ndarray]:
        """A (channels, samples) waveform at the codec's rate per chunk, in ``chunks``' order.

        A diffusion batch whose working memory (attention included, see
        :func:`mvjax.inference.throughput.diffusion_bytes_per_row`) does not fit the free memory is
        decoded in pieces of the same padded length, so its noise and results do not change."""
        diffusion = self._diffusion() if decoder == "mbd" else None
        out = {id(c): np.zeros((1, 0), np.float32) for c in chunks if c.all_codebooks.shape[1] == 0}
        ordered = sorted((c for c in chunks if c.all_codebooks.shape[1] > 0), key=lambda c: c.all_codebooks.shape[1])
        for group in batcher.batches(ordered, "diffusion" if diffusion is not None else "codec"):
            frames = diffusion_frames_bucket(max(c.all_codebooks.shape[1] for c in group))
            pieces = [group]
            if diffusion is not None and len(group) > 1:
                per_row = diffusion_bytes_per_row(diffusion, frames * self.codec.config.hop_length, frames)
                fit = rows_that_fit(per_row) * memory_pools(batcher.mesh)  # CPU devices share one memory
                if fit < len(group):
                    log.info("diffusion: %d chunks of %d frames need ~%.1f GB; decoding %d at a time", len(group),
                             frames, len(group) * per_row / 1e9, fit)
                pieces = [group[i : i + fit] for i in range(0, len(group), fit)]
            for piece in pieces:
                out.update(zip(map(id, piece), self._decode(piece, frames, diffusion, batcher)))
        return [out[id(c)] for c in chunks]

    def _decode(self, batch: list[Chunk], frames: int, diffusion, batcher: Batcher) -> list[np.ndarray]:
        hop = self.codec.config.hop_length
        codes = np.stack([np.pad(c.all_codebooks, ((0, 0), (0, frames - c.all_codebooks.shape[1])), mode="edge")
                          for c in batch])
        rows = padded_size(next_pow2(len(batch)), batcher.mesh)
        with batcher.timer("codec"):
            latent, wav_codec = self.codec.decode(pad_rows(codes, rows))
        lengths = [c.all_codebooks.shape[1] * hop for c in batch]
        if diffusion is None:
            return [wav_codec[i, :, :n].astype(np.float32) for i, n in enumerate(lengths)]
        with batcher.timer("diffusion"):
            keys = pad_rows(np.stack([K.fold(c.key, K.DIFFUSION) for c in batch]), rows)
            diffused = diffusion.generate(latent, wav_codec.shape, row_keys=keys)
            return [re_eq(diffused[i, :, :n], wav_codec[i, :, :n], self.codec.config.sample_rate)
                    for i, n in enumerate(lengths)]
