"""Text + reference voice -> speech: the whole MetaVoice-1B pipeline behind one object.

    tts = TTS.load("models/metavoice-1b")
    speech = tts.synthesize("Hello there.", speaker="voice.wav", seed=0)
    speech.save("hello.wav")

:class:`TTS` loads each component once and keeps its jitted functions, so a second call with
texts in the same length buckets does not recompile. It only wires the stages; each step
lives in the module that owns it:

speaker embedding (:mod:`~mvjax.inference.speaker`) -> chunk plan (:mod:`~mvjax.inference.longform`)
-> first stage (:class:`~mvjax.inference.decode.FirstStageDecoder`, guidance + top-p) -> codebooks 1-2
-> second stage (:class:`~mvjax.inference.second_stage.SecondStageSampler`, top-k) -> all 8 codebooks
-> EnCodec latent -> multi-band diffusion (or the plain codec) -> crossfaded chunks -> loudness
(-14 LUFS) -> DeepFilterNet3 (48 kHz). Batching and bucketing: :mod:`~mvjax.inference.stages`;
randomness: :mod:`~mvjax.inference.keys`; token layout: :class:`~mvjax.text.layout.TokenLayout`.

A chunk that still fills the first stage's block, or overflows the second's, is split in two
and spoken again (up to :data:`~mvjax.inference.longform.MAX_RESPLITS` times), so no speech is cut.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mvjax.audio.finish import CROSSFADE_SECONDS, crossfade_join, finish_audio
from mvjax.inference import keys as K
from mvjax.inference import longform, stages
from mvjax.inference.decode import (
    BlockFullWarning,
    FirstStageDecoder,
)
from mvjax.inference.options import SynthesisError, SynthesisOptions, normalised_texts
from mvjax.inference.second_stage import SecondStageSampler
from mvjax.inference.speaker import SpeakerSpec, embedding_from_spec, embeddings_for
from mvjax.inference.speech import Speech
from mvjax.nn.kv_cache import cache_kind
from mvjax.text.layout import TokenLayout

log = logging.getLogger("mvjax")


class Lazy:
    """A component built on first use (loading a speaker encoder or diffusion decoder costs time and memory)."""

    def __init__(self, build: Callable[[], object]):
        self.build = build


class TTS:
    """A loaded MetaVoice model. Build with :meth:`load` (any model source) or from components in memory."""

    def __init__(self, first_stage, second_stage, codec=None, *, speaker_encoder=None, diffusion=None, mesh=None,
                 dtype=jnp.float32, quantize: Optional[str] = None, matmul_precision: Optional[str] = None,
                 consume_params: bool = False, kv_cache: Optional[str] = None):
        """``first_stage``/``second_stage``: (GPTConfig, params, Tokenizer); ``codec``: (EncodecConfig, params);
        ``speaker_encoder``: a :class:`~mvjax.inference.speaker.SpeakerEncoder`, or a :class:`Lazy` making
        one when first needed; ``diffusion``: a :class:`~mvjax.inference.diffusion.MultiBandDiffusion`, or a
        :class:`Lazy`. ``matmul_precision``: the :mod:`mvjax.core.precision` policy (default "highest", what the
        parity tool certifies), set process-wide before anything is traced. ``consume_params``: the
        first stage's tree may be emptied while it is re-laid for decoding (it was loaded for us).
        ``kv_cache``: the first stage's KV cache, ``"float32"``, ``"bf16"`` or ``"int8"``
        (:mod:`mvjax.nn.kv_cache`; default: the compute dtype's)."""
        from mvjax.core.precision import apply as apply_precision

        self.matmul_precision = apply_precision(matmul_precision)
        self.mesh = mesh
        (self.config1, params1, tokenizer1), (self.config2, params2, tokenizer2) = first_stage, second_stage
        self.tokenizers = (tokenizer1, tokenizer2)
        self.layout = TokenLayout.from_offsets(tokenizer1.offset, tokenizer2.offset)
        self.first_stage_decoder = FirstStageDecoder(self.config1, params1, end_of_audio=self.layout.end_of_audio,
                                                     dtype=dtype, mesh=mesh, quantize=quantize,
                                                     consume_params=consume_params, kv_cache=kv_cache)
        del params1  # the decoder keeps its own (re-laid) copy
        self.second_stage_sampler = SecondStageSampler(self.config2, params2, mesh=mesh, pad_token=self.layout.stage2_pad)
        self.codec = stages.Codec(*codec, mesh=mesh) if codec is not None else None
        self.sample_rate = codec[0].sample_rate if codec is not None else 24000
        self._speaker_encoder, self._diffusion, self._enhancer = speaker_encoder, diffusion, None
        self._engines: dict = {}
        self.last_timings: dict[str, float] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, *, devices: Optional[Sequence] = None, mesh="auto",
             speaker_cache_dir="default", cache_root: Optional[str | os.PathLike] = None,
             log_fn: Callable[[str], None] = log.info, quantize: Optional[str] = None,
             matmul_precision: Optional[str] = None, kv_cache: Optional[str] = None) -> "TTS":
        """Load a converted model directory, released checkpoints (converted once into the cache) or
        a Hugging Face repo id (:mod:`mvjax.sources.resolve`). ``mesh``: ``"auto"`` splits batches over
        every local device (or ``devices``) when there are several, ``None`` uses one device.
        ``quantize``: first-stage weights as ``"int8"`` or ``"bf16"``; ``kv_cache``: its KV cache as
        ``"float32"``, ``"bf16"`` or ``"int8"``."""
        from mvjax.core.parallel import local_mesh
        from mvjax.core.precision import resolve as resolve_precision
        from mvjax.inference.diffusion import MultiBandDiffusion
        from mvjax.inference.speaker import SpeakerEncoder
        from mvjax.io.checkpoint import (
            load_encodec,
            load_gpt_stage,
            load_mbd,
            model_components,
        )
        from mvjax.sources.resolve import resolve_model

        resolve_precision(matmul_precision)  # a bad policy or cache kind fails before any download or conversion
        cache_kind(kv_cache)
        model_dir = resolve_model(path, cache_root=cache_root, log_fn=log_fn)
        have = model_components(model_dir, required=("first_stage", "second_stage"))
        if mesh == "auto":
            devs = list(jax.local_devices() if devices is None else devices)
            mesh = local_mesh(devs) if len(devs) > 1 else None
        speaker = Lazy(lambda: SpeakerEncoder.load(model_dir, cache_dir=speaker_cache_dir)) if "speaker_encoder" in have else None
        diffusion = Lazy(lambda: MultiBandDiffusion(*load_mbd(model_dir), mesh=mesh)) if "mbd" in have else None
        return cls(load_gpt_stage(model_dir, "first_stage"), load_gpt_stage(model_dir, "second_stage"),
                   load_encodec(model_dir) if "encodec" in have else None, speaker_encoder=speaker,
                   diffusion=diffusion, mesh=mesh, quantize=quantize, matmul_precision=matmul_precision,
                   consume_params=True, kv_cache=kv_cache)

    @property
    def engine_available(self) -> bool:
        """The continuous-batching first stage runs on one device; over a mesh batches stay static."""
        from mvjax.core.parallel import device_count

        return self.mesh is None or device_count(self.mesh) == 1

    def first_stage_engine(self, slots: int, steps: int = 16):
        """The :class:`mvjax.inference.engine.FirstStageEngine` with ``slots`` slots and ``steps`` tokens
        per call (kept, with its compiled functions, for the next synthesis)."""
        from mvjax.inference.engine import FirstStageEngine

        key = (int(slots), int(steps))
        if key not in self._engines:
            self._engines[key] = FirstStageEngine(self.first_stage_decoder, slots=slots, steps=steps)
        return self._engines[key]

    @property
    def speaker_encoder(self):
        return self._part("_speaker_encoder", "this model has no speaker encoder: pass a speaker embedding instead of audio")

    @property
    def diffusion(self):
        return self._part("_diffusion", "this model has no multi-band diffusion decoder (mbd_comp_*.pt): use decoder='encodec'")

    def _part(self, attr: str, missing: str):
        """An optional component, built on first use when it was given as a :class:`Lazy`."""
        part = getattr(self, attr)
        if part is None:
            raise SynthesisError(missing)
        if isinstance(part, Lazy):
            part = part.build()
            setattr(self, attr, part)
        return part

    def speaker_embedding(self, speaker: SpeakerSpec) -> np.ndarray:
        """An embedding (E,) from an audio path, an ``(audio, rate)`` pair or an embedding array."""
        return embedding_from_spec(speaker, lambda: self.speaker_encoder, self.config1.speaker_emb_dim)

    def plan(self, text: str, max_new_tokens: Optional[int] = None) -> list[str]:
        """Chunks of normalised ``text`` that each fit both stages' blocks."""
        return longform.plan_for_model(text, *self._plan_args, max_new_tokens)

    def chunk_capacity(self, text: str, max_new_tokens: Optional[int] = None) -> tuple[int, int]:
        """(estimated frames, frames both blocks leave room for) for one chunk of normalised text."""
        return longform.chunk_capacity(text, *self._plan_args, max_new_tokens)

    @property
    def _plan_args(self) -> tuple:
        frame_rate = self.codec.config.frame_rate if self.codec is not None else 75.0
        return self.tokenizers, (self.config1.block_size, self.config2.block_size), frame_rate

    def synthesize(self, text: Union[str, Sequence[str]], speaker=None, *, decoder: str = "mbd", enhance: bool = True,
                   normalize: bool = True, utterance_ids: Optional[Sequence[int]] = None,
                   **options) -> Union[Speech, list[Speech]]:
        """Speak ``text`` (one string, or a list for a batch) in the voice of ``speaker`` (audio path,
        ``(audio, rate)``, embedding array or ``.npy`` path; one for all texts or one per text).

        ``options``: the fields of :class:`~mvjax.inference.options.SynthesisOptions` (seed, both
        stages' sampling, ``max_new_tokens``, ``long_form``, ``batch_size`` as an int, a per-stage
        dict or ``"auto"``, ``batching`` (``"engine"``: the first stage through the continuous-batching
        engine with ``batch_size`` slots, the default on one device; ``"static"``), ``engine_steps``,
        ``progress``). ``decoder``: ``"mbd"`` or ``"encodec"``; ``enhance``:
        DeepFilterNet3 (48 kHz output); ``normalize``: -14 LUFS. ``utterance_ids``: each text's index
        for its random key (default 0, 1, ...). Returns one :class:`Speech` per text."""
        if decoder not in ("mbd", "encodec"):
            raise SynthesisError(f"decoder must be 'mbd' or 'encodec', not {decoder!r}")
        if self.codec is None:
            raise SynthesisError("this model has no EnCodec codec (encodec_24khz-*.th): it cannot make audio")
        opts = SynthesisOptions(**options)
        sizes = self._batch_sizes(opts, decoder)
        normalised, embeddings, chunks = self._tokens(text, speaker, opts, sizes, utterance_ids)
        self.decode_chunks(chunks, decoder, sizes["decoder"], opts.progress)
        results = [self._finish(t, embeddings[u], [c for c in chunks if c.utterance == u], normalize, enhance)
                   for u, t in enumerate(normalised)]
        return results[0] if isinstance(text, str) else results

    def tokens(self, text: Union[str, Sequence[str]], speaker=None, *, utterance_ids=None,
               **options) -> Union[Speech, list[Speech]]:
        """Both GPT stages only: :class:`Speech` objects whose ``audio`` is empty (no codec needed)."""
        opts = SynthesisOptions(**options)
        normalised, embeddings, chunks = self._tokens(text, speaker, opts, self._batch_sizes(opts, None), utterance_ids)
        results = [self._speech(t, np.zeros(0, np.float32), self.sample_rate, embeddings[u],
                                [c for c in chunks if c.utterance == u]) for u, t in enumerate(normalised)]
        return results[0] if isinstance(text, str) else results

    def _batch_sizes(self, opts: SynthesisOptions, decoder: Optional[str]) -> dict:
        from mvjax.inference.throughput import resolve_batch_sizes

        return resolve_batch_sizes(self, opts.batch_size, decoder, opts.max_new_tokens)

    def _tokens(self, text, speaker, opts: SynthesisOptions, sizes: dict, utterance_ids):
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise SynthesisError("no text given")
        ids = list(range(len(texts))) if utterance_ids is None else list(utterance_ids)
        if len(ids) != len(texts):
            raise SynthesisError(f"got {len(ids)} utterance ids for {len(texts)} texts")
        normalised = normalised_texts(texts)
        self.last_timings = {}
        with stages.Timer(self.last_timings, "speaker"):
            embeddings = embeddings_for(speaker, len(texts), self.speaker_embedding)
        chunks = []
        for u, (t, key) in enumerate(zip(normalised, K.keys_for(opts.seed, ids))):
            pieces = self.plan(t, opts.max_new_tokens) if opts.long_form else [t]
            chunks += self.chunks_for(u, pieces, key)
            if len(pieces) > 1:
                log.info("text %d: %d chunks of %s characters", u + 1, len(pieces), ", ".join(str(len(p)) for p in pieces))
        return normalised, embeddings, self.run_token_stages(chunks, embeddings, opts, sizes)

    @staticmethod
    def chunks_for(utterance: int, pieces: Sequence[str], key, sampling=None) -> list:
        """The :class:`~mvjax.inference.stages.Chunk` s of one utterance's planned ``pieces``: chunk ``j``
        draws from ``fold(key, j)``, so it gets the same tokens in whatever batch it runs."""
        return [stages.Chunk(utterance, (j,), piece, K.fold(key, j), sampling) for j, piece in enumerate(pieces)]

    def run_token_stages(self, chunks: list, embeddings: np.ndarray, opts: SynthesisOptions, sizes: dict) -> list:
        """Both GPT stages for ``chunks`` (any utterances; ``embeddings[c.utterance]`` is a chunk's
        speaker): a chunk that overflows a block is split in two and run again. Returns the chunks
        done, sorted by (utterance, order), with codes and reports filled in."""
        batcher = stages.Batcher(self.mesh, opts.progress)
        todo, done = chunks, []
        for attempt in range(longform.MAX_RESPLITS + 1):
            with stages.Timer(self.last_timings, "stage1"):
                if opts.batching == "engine" and self.engine_available:
                    stages.run_first_stage_engine(self.first_stage_engine(sizes["stage1"], opts.engine_steps),
                                                  self.tokenizers, self.layout, self.config2.block_size, todo,
                                                  embeddings, opts.first_stage_sampling, opts.max_new_tokens,
                                                  opts.progress)
                else:
                    stages.run_first_stage(self.first_stage_decoder, self.tokenizers, self.layout,
                                           self.config2.block_size, todo, embeddings, opts.first_stage_sampling,
                                           opts.max_new_tokens, sizes["stage1"], batcher)
            retry = []
            for c in todo:
                halves = self.overflow_halves(c, opts.long_form, attempt)
                if halves is None:
                    done.append(c)
                else:
                    retry += halves
            if not retry:
                break
            todo = retry
        chunks = sorted(done, key=lambda c: (c.utterance, c.order))
        for c in chunks:
            if c.report.hit_block_end or c.report.stage2_cut:
                warnings.warn(f"text {c.utterance + 1}: a chunk filled the model's block and its speech is cut short: "
                              f"{c.text[:60]!r}", BlockFullWarning, stacklevel=3)
        self.second_stage(chunks, embeddings, opts, sizes["stage2"])
        return chunks

    @staticmethod
    def overflow_halves(chunk, long_form: bool, attempt: int) -> Optional[list]:
        """The two chunks to run instead of ``chunk`` when its first stage overflowed a block (and it
        may still be split: long-form on, fewer than ``longform.MAX_RESPLITS`` splits so far); else None."""
        overflow = chunk.report.hit_block_end or chunk.report.stage2_cut
        if not (overflow and long_form and attempt < longform.MAX_RESPLITS):
            return None
        texts = longform.split_in_two(chunk.text)
        if len(texts) == 1:
            return None
        log.info("chunk of %d characters overflowed a block; splitting it in two", len(chunk.text))
        return chunk.halves(texts)

    def second_stage(self, chunks: list, embeddings: np.ndarray, opts: SynthesisOptions, batch_size: int) -> None:
        """Codebooks 3-8 (``all_codebooks``) for chunks whose first stage is done."""
        with stages.Timer(self.last_timings, "stage2"):
            stages.run_second_stage(self.second_stage_sampler, self.layout, self.config2.block_size, chunks, embeddings,
                                    opts.stage2_temperature, opts.stage2_top_k, batch_size,
                                    stages.Batcher(self.mesh, opts.progress))

    def decode_chunks(self, chunks: list, decoder: str, batch_size: int, progress: bool = False) -> None:
        """Each chunk's waveform (``wav``, (channels, samples) at :attr:`sample_rate`) from its codebooks."""
        stages.run_decoder(self.codec, self.diffusion if decoder == "mbd" else None, chunks, batch_size,
                           stages.Batcher(self.mesh, progress), self.last_timings)

    def _finish(self, text, embedding, chunks, normalize, enhance) -> Speech:
        wav = crossfade_join([c.wav for c in chunks], self.sample_rate, CROSSFADE_SECONDS)
        if enhance and self._enhancer is None:
            from mvjax.audio.enhance import DeepFilterNet3

            self._enhancer = DeepFilterNet3()
        wav, rate = finish_audio(wav, self.sample_rate, normalize, self._enhancer if enhance else None,
                                 self.last_timings)
        return self._speech(text, wav.reshape(-1), rate, embedding, chunks)

    @staticmethod
    def _speech(text, audio, rate, embedding, chunks) -> Speech:
        return Speech(text, np.asarray(audio, np.float32), rate, np.asarray(embedding, np.float32),
                      np.concatenate([c.first_stage_codes for c in chunks], axis=1),
                      np.concatenate([c.all_codebooks for c in chunks], axis=1), [c.report for c in chunks])

    def close(self) -> None:
        if self._enhancer is not None:
            self._enhancer.close()
            self._enhancer = None

