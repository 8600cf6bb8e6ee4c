"""Text + reference voice -> speech: the whole MetaVoice-1B pipeline behind one object.

    tts = TTS.load("models/metavoice-1b")
    speech = tts.synthesize("Hello there.", speaker="voice.wav", seed=0)
    speech.save("hello.wav")

:class:`TTS` loads each component once and keeps its jitted functions, so a second call with
texts in the same length buckets does not recompile. It holds the model and wires it:

speaker embedding (:mod:`~mvjax.inference.speaker`) -> chunk plan (:mod:`~mvjax.inference.longform`)
-> :class:`~mvjax.inference.scheduler.Scheduler`, which runs every chunk through the stage objects
of :mod:`~mvjax.inference.stages` (first stage: guidance + top-p, static batches or the
continuous-batching engine -> codebooks 1-2; second stage, top-k -> all 8 codebooks; EnCodec
latent -> multi-band diffusion or the plain codec) and re-splits a chunk that overflows a block
-> crossfaded chunks, loudness (-14 LUFS) and DeepFilterNet3 (48 kHz) (:mod:`mvjax.audio.finish`).
Randomness: :mod:`~mvjax.inference.keys`; token layout: :class:`~mvjax.text.layout.TokenLayout`.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mvjax.audio.enhance import DeepFilterNet3
from mvjax.audio.finish import CROSSFADE_SECONDS, crossfade_join, finish_audio
from mvjax.core.parallel import device_count, local_mesh
from mvjax.core.precision import apply as apply_precision
from mvjax.core.precision import resolve as resolve_precision
from mvjax.inference import keys as K
from mvjax.inference import longform
from mvjax.inference.decode import FirstStageDecoder
from mvjax.inference.diffusion import MultiBandDiffusion
from mvjax.inference.options import StreamSettings, SynthesisError, SynthesisOptions, normalised_texts
from mvjax.inference.scheduler import Scheduler, Utterance
from mvjax.inference.second_stage import SecondStageSampler
from mvjax.inference.speaker import SpeakerEncoder, SpeakerSpec, embedding_from_spec, embeddings_for
from mvjax.inference.speech import Speech
from mvjax.inference.stages import Codec, FirstStage, SecondStage, Timer, WaveDecoder
from mvjax.inference.streaming import SpeechStream
from mvjax.inference.throughput import resolve_batch_sizes
from mvjax.io.checkpoint import load_encodec, load_gpt_stage, load_mbd, model_components
from mvjax.nn.kv_cache import cache_kind
from mvjax.sources.resolve import resolve_model
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
        self.codec = Codec(*codec, mesh=mesh) if codec is not None else None
        self.sample_rate = codec[0].sample_rate if codec is not None else 24000
        self.first_stage = FirstStage(self.first_stage_decoder, tokenizer1, self.layout, self.config2.block_size)
        self.second_stage = SecondStage(self.second_stage_sampler, tokenizer2, self.layout, self.config2.block_size)
        self.wave_decoder = WaveDecoder(self.codec, lambda: self.diffusion) if self.codec is not None else None
        self._speaker_encoder, self._diffusion, self._enhancer = speaker_encoder, diffusion, None
        self.last_timings: dict[str, float] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, *, devices: Optional[Sequence] = None, mesh="auto",
             speaker_cache_dir="default", cache_root: Optional[str | os.PathLike] = None,
             log_fn: Callable[[str], None] = log.info, quantize: Optional[str] = None,
             matmul_precision: Optional[str] = None, kv_cache: Optional[str] = None) -> "TTS":
        """Load a converted model directory, released checkpoints (converted once into the cache) or
        a Hugging Face repo id (:mod:`mvjax.sources.resolve`). ``mesh``: ``"auto"`` splits batches over
        every local device (or ``devices``) when there are several, ``None`` uses one device.
        ``quantize``: first-stage weights as ``"int8"``, ``"int4"`` or ``"bf16"``; ``kv_cache``: its KV cache as
        ``"float32"``, ``"bf16"`` or ``"int8"``."""
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
    def devices(self) -> int:
        return 1 if self.mesh is None else device_count(self.mesh)

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

    @property
    def plan_args(self) -> tuple:
        """(tokenizers, both blocks, frame rate): what :mod:`~mvjax.inference.longform` plans with."""
        frame_rate = self.codec.config.frame_rate if self.codec is not None else 75.0
        return self.tokenizers, (self.config1.block_size, self.config2.block_size), frame_rate

    def plan(self, text: str, max_new_tokens: Optional[int] = None) -> list[str]:
        """Chunks of normalised ``text`` that each fit both stages' blocks."""
        return longform.plan_for_model(text, *self.plan_args, max_new_tokens)

    def scheduler(self, options: SynthesisOptions, sizes: Optional[dict] = None, room: Optional[int] = None,
                  lock=None, audio: bool = True) -> Scheduler:
        """A :class:`~mvjax.inference.scheduler.Scheduler` over this model's stages (``sizes``: per-stage
        batch sizes, default from ``options.batch_size``; ``audio``: make waveforms, not only tokens).
        Stage timings go to :attr:`last_timings`."""
        decoder = options.decoder if audio else None
        sizes = sizes or resolve_batch_sizes(self, options.batch_size, decoder, options.max_new_tokens)
        self.last_timings = {}
        return Scheduler((self.first_stage, self.second_stage, self.wave_decoder if audio else None), options, sizes,
                         room, lock, self.last_timings)

    def synthesize(self, text: Union[str, Sequence[str]], speaker=None, *, options: Optional[SynthesisOptions] = None,
                   utterance_ids: Optional[Sequence[int]] = None, **fields) -> Union[Speech, list[Speech]]:
        """Speak ``text`` (one string, or a list for a batch) in the voice of ``speaker`` (audio path,
        ``(audio, rate)``, embedding array or ``.npy`` path; one for all texts or one per text).

        ``options``: a :class:`~mvjax.inference.options.SynthesisOptions`, or its fields as keywords
        (seed, both stages' sampling, ``max_new_tokens``, ``long_form``, ``batch_size`` as an int, a
        per-stage dict or ``"auto"``, ``batching`` (``"engine"``: the first stage through the
        continuous-batching engine with ``batch_size`` slots per device, the default;
        ``"static"``), ``engine_steps``, ``decoder`` (``"mbd"`` or ``"encodec"``), ``enhance``
        (DeepFilterNet3, 48 kHz output), ``normalize`` (-14 LUFS), ``progress``). ``utterance_ids``:
        each text's index for its random key (default 0, 1, ...). Returns one :class:`Speech` per text."""
        if self.codec is None:
            raise SynthesisError("this model has no EnCodec codec (encodec_24khz-*.th): it cannot make audio")
        opts = _options(options, fields)
        if opts.decoder == "mbd":
            _ = self.diffusion  # a model without one fails before any token is sampled
        utterances = self._run(text, speaker, opts, utterance_ids, audio=True)
        results = [self.finish(u, opts) for u in utterances]
        return results[0] if isinstance(text, str) else results

    def tokens(self, text: Union[str, Sequence[str]], speaker=None, *, options: Optional[SynthesisOptions] = None,
               utterance_ids=None, **fields) -> Union[Speech, list[Speech]]:
        """Both GPT stages only: :class:`Speech` objects whose ``audio`` is empty (no codec needed)."""
        utterances = self._run(text, speaker, _options(options, fields), utterance_ids, audio=False)
        results = [_speech(u, np.zeros(0, np.float32), self.sample_rate) for u in utterances]
        return results[0] if isinstance(text, str) else results

    def stream(self, text: str, speaker=None, *, options: Optional[SynthesisOptions] = None,
               streaming: Optional[StreamSettings] = StreamSettings(), **fields) -> SpeechStream:
        """Speak ``text`` as a stream: iterate the result for mono float32 pieces at its ``sample_rate``
        as they are made (:mod:`mvjax.inference.streaming`). ``streaming``: audio within a chunk every
        few frames (:class:`~mvjax.inference.options.StreamSettings`; None: whole chunks); ``options``
        or keyword fields as for :meth:`synthesize`."""
        opts = _options(options, fields)
        if opts.decoder == "mbd":
            _ = self.diffusion
        (utterance,) = self._utterances(text, speaker, opts, None)
        utterance.streaming = streaming
        return SpeechStream(self.scheduler(opts), utterance, opts, self.sample_rate)

    def _run(self, text, speaker, opts: SynthesisOptions, utterance_ids, audio: bool) -> list[Utterance]:
        """Every text planned into an :class:`Utterance` and run to the end through one scheduler."""
        scheduler = self.scheduler(opts, audio=audio)
        utterances = self._utterances(text, speaker, opts, utterance_ids)
        scheduler.run(utterances)
        return utterances

    def _utterances(self, text, speaker, opts: SynthesisOptions, utterance_ids) -> list[Utterance]:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise SynthesisError("no text given")
        ids = list(range(len(texts))) if utterance_ids is None else list(utterance_ids)
        if len(ids) != len(texts):
            raise SynthesisError(f"got {len(ids)} utterance ids for {len(texts)} texts")
        normalised = normalised_texts(texts)
        with Timer(self.last_timings, "speaker"):
            embeddings = embeddings_for(speaker, len(texts), self.speaker_embedding)
        utterances = []
        for u, (t, key) in enumerate(zip(normalised, K.keys_for(opts.seed, ids))):
            pieces = self.plan(t, opts.max_new_tokens) if opts.long_form else [t]
            if len(pieces) > 1:
                log.info("text %d: %d chunks of %s characters", u + 1, len(pieces), ", ".join(str(len(p)) for p in pieces))
            utterances.append(Utterance(pieces, embeddings[u], key, opts.sampling, opts.decoder, index=u, text=t))
        return utterances

    def utterance(self, text: str, speaker, options: SynthesisOptions) -> Utterance:
        """``text`` planned and keyed as :meth:`synthesize` keys a text given alone (utterance id 0 of
        ``options.seed``), for callers that run their own :meth:`scheduler` and :meth:`finish` (the
        dataset job): its tokens then equal ``synthesize``'s for that text, voice and seed."""
        (normalised,) = normalised_texts([text])
        pieces = self.plan(normalised, options.max_new_tokens) if options.long_form else [normalised]
        return Utterance(pieces, self.speaker_embedding(speaker), K.keys_for(options.seed, [0])[0], options.sampling,
                         options.decoder, text=normalised)

    def finish(self, utterance: Utterance, opts: SynthesisOptions) -> Speech:
        """A delivered utterance's chunks joined and finished (loudness, enhancement) into a :class:`Speech`."""
        wav = crossfade_join([c.wav for c in utterance.chunks], self.sample_rate, CROSSFADE_SECONDS)
        if opts.enhance and self._enhancer is None:
            self._enhancer = DeepFilterNet3()
        wav, rate = finish_audio(wav, self.sample_rate, opts.normalize, self._enhancer if opts.enhance else None,
                                 self.last_timings)
        return _speech(utterance, wav.reshape(-1), rate)

    def close(self) -> None:
        if self._enhancer is not None:
            self._enhancer.close()
            self._enhancer = None


def _options(options: Optional[SynthesisOptions], fields: dict) -> SynthesisOptions:
    if options is not None and fields:
        raise SynthesisError(f"give options or keyword fields, not both ({', '.join(sorted(fields))})")
    return options if options is not None else SynthesisOptions.build(**fields)


def _speech(utterance: Utterance, audio: np.ndarray, rate: int) -> Speech:
    chunks = utterance.chunks
    return Speech(utterance.text, np.asarray(audio, np.float32), rate, utterance.embedding,
                  np.concatenate([c.first_stage_codes for c in chunks], axis=1),
                  np.concatenate([c.all_codebooks for c in chunks], axis=1), [c.report for c in chunks])
