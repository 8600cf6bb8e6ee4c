"""The stages run over batches of chunks: bucketing, padding, device splitting, per-chunk results.

A :class:`Chunk` is one piece of one text on its way through the model; each ``run_*``
function takes a list of them, groups them into batches (sorted by length, so similar
lengths share a padded shape and a compiled program; padded to a power of two rows and a
multiple of the device count) and fills in its result on every chunk. Nothing here depends
on how many chunks share a batch: each chunk draws from its own key (:mod:`mvjax.inference.keys`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Iterable, Optional

import jax
import numpy as np

from mvjax.core.parallel import device_count, pad_rows, padded_size, put_batch
from mvjax.inference import keys as K
from mvjax.inference.decode import (
    BlockFullWarning,
    FirstStageDecoder,
    SamplingConfig,
    next_pow2,
)
from mvjax.inference.second_stage import SecondStageSampler
from mvjax.inference.speech import ChunkReport
from mvjax.text.layout import (
    TokenLayout,
    build_second_stage_input,
    second_stage_codebooks,
    split_first_stage_tokens,
)

log = logging.getLogger("mvjax")
# One line per chunk, at DEBUG (a server logs one INFO line per request; the synthesize CLI shows these).
chunk_log = logging.getLogger("mvjax.chunks")


@dataclasses.dataclass
class Chunk:
    utterance: int
    order: tuple  # position within its utterance; a re-split chunk's halves extend it
    text: str
    key: np.ndarray  # (2,) uint32
    sampling: Optional[SamplingConfig] = None  # this chunk's first-stage sampling (None: the batch's)
    prompt: list = dataclasses.field(default_factory=list)
    stage2_text: list = dataclasses.field(default_factory=list)
    first_stage_codes: Optional[np.ndarray] = None
    all_codebooks: Optional[np.ndarray] = None
    report: Optional[ChunkReport] = None
    wav: Optional[np.ndarray] = None

    def halves(self, texts: list[str]) -> list["Chunk"]:
        """This chunk re-split: one new chunk per text, keys folded from this one."""
        return [Chunk(self.utterance, self.order + (h,), t, K.fold(self.key, h + 1), self.sampling)
                for h, t in enumerate(texts)]


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
    """Splits chunk lists into batches of ``size`` per device; on a terminal, counts chunks done."""

    mesh: object = None
    progress: bool = False

    def batches(self, items: list, size: int, desc: str) -> Iterable[list]:
        per_call = max(1, size) * (device_count(self.mesh) if self.mesh is not None else 1)
        groups = [items[i : i + per_call] for i in range(0, len(items), per_call)]
        if not (self.progress and groups):
            return groups
        return _counted(groups, len(items), desc)


def _counted(groups: list[list], total: int, desc: str):
    """Yield ``groups`` while a terminal bar counts chunks done of ``total``, with rate and ETA."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="chunk", leave=False, dynamic_ncols=True) as bar:
        for group in groups:
            yield group
            bar.update(len(group))


def tokenize(tokenizers, chunks: list[Chunk]) -> None:
    """Each chunk's first-stage prompt and second-stage text ids (``tokenizers``: both stages')."""
    tokenizer1, tokenizer2 = tokenizers
    for c in chunks:
        c.prompt = tokenizer1.encode(c.text)
        c.stage2_text = tokenizer2.encode(c.text)


def run_first_stage(decoder: FirstStageDecoder, tokenizers, layout: TokenLayout, stage2_block: int, chunks: list[Chunk],
                    embeddings: np.ndarray, sampling: SamplingConfig, max_new_tokens: Optional[int], batch_size: int,
                    batcher: Batcher) -> None:
    """Codebooks 1-2 (``first_stage_codes``) and a :class:`ChunkReport` for every chunk."""
    tokenize(tokenizers, chunks)
    ordered = sorted(chunks, key=lambda c: len(c.prompt))
    for batch in batcher.batches(ordered, batch_size, "stage 1"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BlockFullWarning)  # reported per chunk by the caller
            result = decoder.generate(
                [c.prompt for c in batch], embeddings[[c.utterance for c in batch]],
                np.stack([K.fold(c.key, K.STAGE1) for c in batch]), [c.sampling or sampling for c in batch],
                max_new_tokens=max_new_tokens, pad_to=next_pow2(len(batch)),
            )
        for i, c in enumerate(batch):
            record_first_stage(c, result.sequences[i], bool(result.finished[i]), bool(result.hit_block_end[i]),
                               layout, stage2_block)


def record_first_stage(c: Chunk, sequence: np.ndarray, finished: bool, hit_block_end: bool, layout: TokenLayout,
                       stage2_block: int) -> None:
    """Fill in a chunk's ``first_stage_codes`` and :class:`ChunkReport` from its first-stage sequence
    (prompt then generated tokens)."""
    _, codes = split_first_stage_tokens(sequence, layout.codebook_size)
    c.first_stage_codes = codes
    frames = codes.shape[1]
    room = stage2_block - len(c.stage2_text) - 1
    c.report = ChunkReport(
        text=c.text, prompt_tokens=len(c.prompt), generated_tokens=int(len(sequence) - len(c.prompt)),
        frames=min(frames, max(room, 0)), finished=finished, hit_block_end=hit_block_end, stage2_cut=frames > room,
    )
    chunk_log.debug("chunk %r: %d prompt tokens, %d generated, %d frames%s", c.text[:40], c.report.prompt_tokens,
                    c.report.generated_tokens, frames, " (block full)" if c.report.hit_block_end else "")


def engine_request(c: Chunk, embedding: Optional[np.ndarray], sampling: SamplingConfig,
                   max_new_tokens: Optional[int]):
    """The :class:`mvjax.inference.engine.EngineRequest` for a tokenised chunk (its stage-1 key, its
    own sampling when it has one); the chunk rides along as the tag."""
    from mvjax.inference.engine import EngineRequest

    return EngineRequest(c.prompt, K.fold(c.key, K.STAGE1), embedding, c.sampling or sampling, max_new_tokens, tag=c)


def run_first_stage_engine(engine, tokenizers, layout: TokenLayout, stage2_block: int, chunks: list[Chunk],
                           embeddings: np.ndarray, sampling: SamplingConfig, max_new_tokens: Optional[int],
                           progress: bool = False) -> None:
    """:func:`run_first_stage` through a continuous-batching engine: every chunk takes a slot as one
    frees up (no chunk waits for the longest of a batch); same tokens as the static batches."""
    tokenize(tokenizers, chunks)
    # Longest prompts first: they tend to run longest, so the tail of the run is short chunks.
    for c in sorted(chunks, key=lambda c: -len(c.prompt)):
        engine.submit(engine_request(c, None if embeddings is None else embeddings[c.utterance], sampling,
                                     max_new_tokens))
    bar = None
    if progress and chunks:
        from tqdm import tqdm

        bar = tqdm(total=len(chunks), desc="stage 1", unit="chunk", leave=False, dynamic_ncols=True)
    try:
        while not engine.idle:
            for result in engine.step():
                record_first_stage(result.tag, result.sequence, result.finished, result.hit_block_end, layout,
                                   stage2_block)
                if bar is not None:
                    bar.update(1)
        engine.release()
    except BaseException:
        engine.reset()
        raise
    finally:
        if bar is not None:
            bar.close()


def run_second_stage(sampler: SecondStageSampler, layout: TokenLayout, block_size: int, chunks: list[Chunk],
                     embeddings: np.ndarray, temperature: float, top_k: Optional[int], batch_size: int,
                     batcher: Batcher) -> None:
    """All codebooks (``all_codebooks``) for every chunk from its first-stage codes."""
    for batch in batcher.batches(chunks, batch_size, "stage 2"):
        inputs = np.stack([build_second_stage_input(c.stage2_text, c.first_stage_codes, block_size, layout.stage2_pad)
                           for c in batch])
        keys = np.stack([K.fold(c.key, K.STAGE2) for c in batch])
        pad = next_pow2(len(batch))
        predicted = sampler.sample(pad_rows(inputs, pad), pad_rows(embeddings[[c.utterance for c in batch]], pad),
                                   pad_rows(keys, pad), temperature=temperature, top_k=top_k)
        for i, c in enumerate(batch):
            c.all_codebooks = second_stage_codebooks(inputs[i], predicted[i], len(c.stage2_text),
                                                     c.first_stage_codes.shape[1])


def run_decoder(codec, diffusion, chunks: list[Chunk], batch_size: int, batcher: Batcher, timings: dict) -> None:
    """A waveform (``wav``, (channels, samples) at the codec's rate) for every chunk.

    ``codec``: :class:`Codec` (latent and plain decoding); ``diffusion``: a
    :class:`mvjax.inference.diffusion.MultiBandDiffusion`, or None for the plain codec output.
    A diffusion batch whose working memory (attention included, see
    :func:`mvjax.inference.throughput.diffusion_bytes_per_row`) does not fit the free memory is
    decoded in pieces of the same padded length, so its noise and results do not change.
    """
    from mvjax.inference.throughput import diffusion_bytes_per_row, memory_pools, rows_that_fit

    for c in chunks:
        if c.all_codebooks.shape[1] == 0:
            c.wav = np.zeros((1, 0), np.float32)
    ordered = sorted((c for c in chunks if c.all_codebooks.shape[1] > 0), key=lambda c: c.all_codebooks.shape[1])
    for group in batcher.batches(ordered, batch_size, "diffusion" if diffusion is not None else "codec"):
        frames = diffusion_frames_bucket(max(c.all_codebooks.shape[1] for c in group))
        pieces = [group]
        if diffusion is not None and len(group) > 1:
            per_row = diffusion_bytes_per_row(diffusion, frames * codec.config.hop_length, frames)
            fit = rows_that_fit(per_row) * memory_pools(batcher.mesh)  # CPU devices share one memory
            if fit < len(group):
                log.info("diffusion: %d chunks of %d frames need ~%.1f GB; decoding %d at a time", len(group), frames,
                         len(group) * per_row / 1e9, fit)
            pieces = [group[i : i + fit] for i in range(0, len(group), fit)]
        for piece in pieces:
            _decode_piece(codec, diffusion, piece, frames, batcher.mesh, timings)


def _decode_piece(codec, diffusion, batch: list[Chunk], frames: int, mesh, timings: dict) -> None:
    from mvjax.inference.diffusion import re_eq

    hop = codec.config.hop_length
    codes = np.stack([np.pad(c.all_codebooks, ((0, 0), (0, frames - c.all_codebooks.shape[1])), mode="edge")
                      for c in batch])
    rows = padded_size(next_pow2(len(batch)), mesh)
    with Timer(timings, "codec"):
        latent, wav_codec = codec.decode(pad_rows(codes, rows))
    if diffusion is None:
        for i, c in enumerate(batch):
            c.wav = wav_codec[i, :, : c.all_codebooks.shape[1] * hop].astype(np.float32)
        return
    with Timer(timings, "diffusion"):
        keys = pad_rows(np.stack([K.fold(c.key, K.DIFFUSION) for c in batch]), rows)
        diffused = diffusion.generate(latent, wav_codec.shape, row_keys=keys)
        for i, c in enumerate(batch):
            n = c.all_codebooks.shape[1] * hop
            c.wav = re_eq(diffused[i, :, :n], wav_codec[i, :, :n], codec.config.sample_rate)


class Codec:
    """The EnCodec decoder of a model: codes -> (latent, waveform), jitted once, split over ``mesh``."""

    def __init__(self, config, params, mesh=None):
        from mvjax.core.parallel import put_replicated
        from mvjax.nn import encodec

        self.config, self.mesh = config, mesh
        self.params = put_replicated(params, mesh)
        self._decode_latent = jax.jit(lambda p, latent: encodec.decode_latent(config, p, latent))

    def decode(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """codes (B, n_q, F) -> (latent (B, D, F), waveform (B, channels, F * hop)), numpy."""
        from mvjax.nn import encodec

        latent = np.asarray(encodec.codes_to_latent(self.params, codes))
        return latent, np.asarray(self._decode_latent(self.params, put_batch(latent, self.mesh)))
