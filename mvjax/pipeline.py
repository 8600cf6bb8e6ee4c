"""Text + reference voice -> speech: the whole MetaVoice-1B pipeline behind one object.

    tts = TTS.load("models/metavoice-1b")
    speech = tts.synthesize("Hello there.", speaker="voice.wav", seed=0)
    speech.save("hello.wav")

:class:`TTS` loads each component once and keeps its jitted functions, so a second call
with texts in the same length buckets does not recompile. It wires the stages together
and owns no numerics:

speaker embedding (:mod:`mvjax.speaker`) -> first stage (:class:`mvjax.decode.FirstStageDecoder`,
guidance + top-p) -> codebooks 1-2 -> second stage (:class:`mvjax.decode.SecondStageSampler`,
top-k) -> all 8 codebooks -> EnCodec latent -> multi-band diffusion (or the plain codec)
-> crossfaded chunks -> loudness (-14 LUFS) -> DeepFilterNet3 (48 kHz).

Long texts are split into chunks that fit both stages' blocks (:mod:`mvjax.longform`); a
chunk that still fills the first stage's block, or overflows the second's, is split again
and re-synthesised, so no speech is cut. Many texts (and their chunks) go through every
stage as batches; with several local devices each batch is split across them
(:mod:`mvjax.parallel`). Randomness comes from one key per text (``seed`` and the text's
index), folded with the chunk number and a per-stage constant, so outputs do not depend on
batching, chunk packing or the device count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mvjax.decode import (
    DEFAULT_GUIDANCE,
    DEFAULT_STAGE2_TEMPERATURE,
    DEFAULT_STAGE2_TOP_K,
    DEFAULT_TOP_P,
    BlockFullWarning,
    FirstStageDecoder,
    SamplingConfig,
    SecondStageSampler,
    utterance_keys,
)
from mvjax.longform import crossfade_join, plan_chunks, split_in_two
from mvjax.text import TextError, build_second_stage_input, normalize_text, second_stage_codebooks, split_first_stage_tokens

log = logging.getLogger("mvjax")

# Speaking rate used to budget chunks: slow English speech, so real speech rarely runs longer.
CHARS_PER_SECOND = 12.0
DEFAULT_BATCH_SIZE = 8
CROSSFADE_SECONDS = 0.05
MAX_RESPLITS = 4
# Per-stage constants folded into a chunk's key.
_STAGE1, _STAGE2, _DIFFUSION = 1, 2, 3

SpeakerSpec = Union[str, os.PathLike, np.ndarray, tuple]


class SynthesisError(ValueError):
    """Input the pipeline cannot synthesise (text, speaker, options)."""


@dataclasses.dataclass
class ChunkReport:
    text: str
    prompt_tokens: int  # first-stage prompt length (text ids + end of text)
    generated_tokens: int  # first-stage tokens generated (end of audio included)
    frames: int  # codec frames spoken (after the second stage)
    finished: bool  # the first stage produced end of audio
    hit_block_end: bool  # the first stage filled its block (speech cut short)
    stage2_cut: bool  # the second stage's block cut frames


@dataclasses.dataclass
class Speech:
    """One synthesised text."""

    text: str  # normalised text
    audio: np.ndarray  # (samples,) float32
    sample_rate: int
    speaker_embedding: np.ndarray  # (E,)
    first_stage: np.ndarray  # (2, frames): codebooks 1-2 from the first stage, chunks concatenated
    all_codebooks: np.ndarray  # (n_q, frames'): all codebooks the decoder used, chunks concatenated
    chunks: list[ChunkReport]

    @property
    def duration(self) -> float:
        return self.audio.shape[-1] / self.sample_rate

    @property
    def truncated(self) -> bool:
        return any(c.hit_block_end or c.stage2_cut for c in self.chunks)

    def save(self, path: str | os.PathLike, subtype: str = "PCM_16") -> None:
        from mvjax.audio import write_wav

        write_wav(path, self.audio, self.sample_rate, subtype=subtype)

    def save_tokens(self, path: str | os.PathLike) -> None:
        """``.npz`` with ``first_stage`` (2, F), ``all_codebooks`` (8, F), ``speaker_embedding`` (E,),
        ``chunk_frames`` and ``text`` (written atomically)."""
        arrays = {
            "first_stage": self.first_stage,
            "all_codebooks": self.all_codebooks,
            "speaker_embedding": self.speaker_embedding.astype(np.float32),
            "chunk_frames": np.array([c.frames for c in self.chunks], np.int64),
            "text": np.array(self.text),
        }
        _atomic_npz(Path(path), arrays)


def _atomic_npz(path: Path, arrays: dict) -> None:
    from mvjax.atomic import atomic_path

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


@dataclasses.dataclass
class _Chunk:
    utterance: int
    index: int  # position within its utterance (after re-splits: a fractional order key)
    order: tuple
    text: str
    key: np.ndarray  # (2,) uint32
    prompt: list = dataclasses.field(default_factory=list)
    stage2_text: list = dataclasses.field(default_factory=list)
    first_stage: Optional[np.ndarray] = None
    all_codebooks: Optional[np.ndarray] = None
    report: Optional[ChunkReport] = None
    wav: Optional[np.ndarray] = None


class _Timer:
    """Adds the wall time of a ``with`` block to ``timings[name]``."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        import time

        self.start = time.perf_counter()

    def __exit__(self, *exc):
        import time

        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def diffusion_frames_bucket(frames: int) -> int:
    """Padded frame count for batched decoding: powers of two up to 256, then multiples of 256."""
    if frames <= 256:
        return max(16, _next_pow2(frames))
    return -(-frames // 256) * 256


def _counted(batches: list[list], total: int, desc: str):
    """Yield ``batches`` while a terminal bar counts chunks done of ``total``, with rate and ETA."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="chunk", leave=False, dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


class TTS:
    """A loaded MetaVoice model. Build with :meth:`load`; call :meth:`synthesize`."""

    def __init__(self, model_dir: Path, mesh=None, speaker_cache_dir="default", dtype=jnp.float32, quantize=None,
                 matmul_precision: Optional[str] = None):
        """Load the converted model directory ``model_dir`` (see :meth:`load` for other sources)."""
        from mvjax.checkpoint import ModelDirError, load_encodec, load_gpt_stage, read_manifest

        model_dir = Path(model_dir)
        have = set(read_manifest(model_dir).get("components", {}))
        missing = {"first_stage", "second_stage"} - have
        if missing:
            raise ModelDirError(f"{model_dir} lacks {', '.join(sorted(missing))} (has: {', '.join(sorted(have))})")
        self._setup(
            load_gpt_stage(model_dir, "first_stage"), load_gpt_stage(model_dir, "second_stage"),
            load_encodec(model_dir) if "encodec" in have else None,
            components=have, model_dir=model_dir, mesh=mesh, speaker_cache_dir=speaker_cache_dir, dtype=dtype,
            quantize=quantize, matmul_precision=matmul_precision, owned=True,
        )

    @classmethod
    def from_parts(cls, first_stage, second_stage, codec=None, speaker=None, mbd=None, *, mesh=None,
                   speaker_cache_dir=None, dtype=jnp.float32, quantize=None, matmul_precision=None) -> "TTS":
        """Build from components already in memory: ``first_stage``/``second_stage`` as
        (GPTConfig, params, Tokenizer), ``codec`` (EncodecConfig, params), ``speaker``
        (SpeakerEncoderConfig, params), ``mbd`` (config dict, params); the last three optional."""
        tts = cls.__new__(cls)
        have = {"first_stage", "second_stage"} | {name for name, part in
                                                   (("encodec", codec), ("speaker_encoder", speaker), ("mbd", mbd)) if part}
        tts._setup(first_stage, second_stage, codec, components=have, model_dir=None, mesh=mesh,
                   speaker_cache_dir=speaker_cache_dir, dtype=dtype, quantize=quantize,
                   matmul_precision=matmul_precision)
        if speaker is not None:
            from mvjax.speaker import SpeakerEncoder

            tts._speaker = SpeakerEncoder(speaker[0], speaker[1], "", None)
        if mbd is not None:
            from mvjax.diffusion import MultiBandDiffusion

            tts._mbd = MultiBandDiffusion(mbd[0], mbd[1], mesh=mesh)
        return tts

    def _setup(self, first, second, codec, *, components, model_dir, mesh, speaker_cache_dir, dtype, quantize,
               matmul_precision=None, owned=False):
        """``owned``: the first stage's tree was loaded here, so it may be emptied while re-laid.
        ``matmul_precision``: the policy of :mod:`mvjax.precision` (default "highest", the one
        ``python -m mvjax.parity`` certifies); set process-wide before anything is traced."""
        from mvjax.precision import apply as apply_precision

        self.matmul_precision = apply_precision(matmul_precision)
        self.model_dir = model_dir
        self.mesh = mesh
        self.components = set(components)
        cfg1, params1, self.tokenizer1 = first
        cfg2, params2, self.tokenizer2 = second
        self.config1, self.config2 = cfg1, cfg2
        self.codebook_size = (self.tokenizer1.offset - 1) // 2
        self.stage2_pad = self.tokenizer2.offset - 1
        self.first_stage = FirstStageDecoder(cfg1, params1, end_of_audio=self.tokenizer1.offset - 1, dtype=dtype,
                                             mesh=mesh, quantize=quantize, consume_params=owned)
        del params1  # the decoder keeps its own (re-laid) copy
        self.second_stage = SecondStageSampler(cfg2, params2, mesh=mesh, pad_token=self.stage2_pad)
        if codec is not None:
            self.codec_config, codec_params = codec
        else:  # token generation still works; decoding says what is missing
            from mvjax.nn.encodec import EncodecConfig

            self.codec_config, codec_params = EncodecConfig(), None
        from mvjax.parallel import put_replicated

        self._codec_params = put_replicated(codec_params, mesh)
        self._codec_decode = jax.jit(self._decode_latent)
        self._speaker_cache_dir = speaker_cache_dir
        self._speaker = None
        self._mbd = None
        self._enhancer = None
        self.sample_rate = self.codec_config.sample_rate
        self.last_timings: dict[str, float] = {}

    # --- Loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, devices: Optional[Sequence] = None, mesh="auto",
             speaker_cache_dir="default", cache_root: Optional[str | os.PathLike] = None,
             log_fn: Callable[[str], None] = log.info, quantize: Optional[str] = None,
             matmul_precision: Optional[str] = None) -> "TTS":
        """Load a converted model directory, an unconverted one (converted once into the cache),
        or a Hugging Face repo id (downloaded, then converted). ``mesh``: ``"auto"`` splits batches
        over every local device (or ``devices``) when there are several, ``None`` uses one device.
        ``quantize``: first-stage weights as ``"int8"`` (weight-only, per output channel) or ``"bf16"``.
        ``matmul_precision``: "highest" (default, what the parity tool certifies), "high" or
        "default" (see :mod:`mvjax.precision`)."""
        from mvjax.models import resolve_model
        from mvjax.precision import resolve as resolve_precision

        resolve_precision(matmul_precision)  # a bad policy fails before any download or conversion

        model_dir = resolve_model(path, cache_root=cache_root, log_fn=log_fn)
        if mesh == "auto":
            from mvjax.parallel import local_mesh

            devs = list(jax.local_devices() if devices is None else devices)
            mesh = local_mesh(devs) if len(devs) > 1 else None
        return cls(model_dir, mesh=mesh, speaker_cache_dir=speaker_cache_dir, quantize=quantize,
                   matmul_precision=matmul_precision)

    @property
    def speaker_encoder(self):
        if self._speaker is None:
            from mvjax.speaker import SpeakerEncoder

            if "speaker_encoder" not in self.components or self.model_dir is None:
                raise SynthesisError(f"{self.model_dir or 'this model'} has no speaker encoder: pass a speaker embedding instead of audio")
            self._speaker = SpeakerEncoder.load(self.model_dir, cache_dir=self._speaker_cache_dir)
        return self._speaker

    @property
    def diffusion(self):
        if self._mbd is None:
            from mvjax.checkpoint import load_mbd
            from mvjax.diffusion import MultiBandDiffusion

            if "mbd" not in self.components or self.model_dir is None:
                raise SynthesisError(f"{self.model_dir or 'this model'} has no multi-band diffusion decoder (mbd_comp_*.pt): use decoder='encodec'")
            config, params = load_mbd(self.model_dir)
            self._mbd = MultiBandDiffusion(config, params, mesh=self.mesh)
        return self._mbd

    # --- Speaker -----------------------------------------------------------------------
    def speaker_embedding(self, speaker: SpeakerSpec) -> np.ndarray:
        """An embedding (E,) from an audio path, an ``(audio, rate)`` pair or an embedding array."""
        size = self.config1.speaker_emb_dim
        if isinstance(speaker, tuple):
            audio, rate = speaker
            emb = self.speaker_encoder.embed_audio(np.asarray(audio, np.float32), int(rate))
        elif isinstance(speaker, np.ndarray):
            emb = np.asarray(speaker, np.float32).reshape(-1)
        elif isinstance(speaker, (str, os.PathLike)):
            path = Path(speaker)
            if path.suffix.lower() == ".npy":
                try:
                    emb = np.load(path).astype(np.float32).reshape(-1)
                except (OSError, ValueError) as exc:
                    raise SynthesisError(f"cannot read speaker embedding {path}: {exc}") from None
            else:
                emb = self.speaker_encoder.embed_file(path)
        else:
            raise SynthesisError(f"speaker must be an audio path, (audio, rate) or an embedding array, not {type(speaker).__name__}")
        if size is not None and emb.shape != (size,):
            raise SynthesisError(f"speaker embedding must have shape ({size},), got {emb.shape}")
        if not np.all(np.isfinite(emb)):
            raise SynthesisError("speaker embedding holds NaN or infinite values")
        return emb

    # --- Chunk planning ----------------------------------------------------------------
    def chunk_capacity(self, text: str, max_new_tokens: Optional[int] = None) -> tuple[int, int]:
        """(estimated frames, frames both blocks leave room for) for one chunk of normalised text."""
        n1 = len(self.tokenizer1.encode(text))
        n2 = len(self.tokenizer2.encode(text))
        capacity = min((self.config1.block_size - n1) // 2 - 1, self.config2.block_size - n2 - 1)
        estimate = math.ceil(len(text) / CHARS_PER_SECOND * self.codec_config.frame_rate)
        if max_new_tokens is not None:
            estimate = min(estimate, max_new_tokens // 2)
        return estimate, capacity

    def plan(self, text: str, max_new_tokens: Optional[int] = None) -> list[str]:
        """Chunks of normalised ``text`` that each fit both stages' blocks."""

        def fits(chunk: str) -> bool:
            estimate, capacity = self.chunk_capacity(chunk, max_new_tokens)
            return estimate <= capacity

        return plan_chunks(text, fits)

    # --- Synthesis ---------------------------------------------------------------------
    def synthesize(
        self,
        text: Union[str, Sequence[str]],
        speaker: Union[SpeakerSpec, Sequence[SpeakerSpec], None] = None,
        *,
        seed: int = 0,
        temperature: float = 1.0,
        top_p: Optional[float] = DEFAULT_TOP_P,
        guidance_scale: float = DEFAULT_GUIDANCE,
        stage2_top_k: Optional[int] = DEFAULT_STAGE2_TOP_K,
        stage2_temperature: float = DEFAULT_STAGE2_TEMPERATURE,
        max_new_tokens: Optional[int] = None,
        decoder: str = "mbd",
        enhance: bool = True,
        normalize: bool = True,
        long_form: bool = True,
        batch_size: Union[int, dict, str] = DEFAULT_BATCH_SIZE,
        utterance_ids: Optional[Sequence[int]] = None,
        progress: bool = False,
    ) -> Union[Speech, list[Speech]]:
        """Speak ``text`` (one string, or a list for a batch) in the voice of ``speaker``.

        ``speaker``: audio path, ``(audio, rate)``, embedding array (or ``.npy`` path); one for
        all texts or one per text. ``temperature``, ``top_p`` and ``guidance_scale`` shape the
        first stage; ``stage2_temperature`` (1.0, fixed in the reference's synthesis) and
        ``stage2_top_k`` the second. A temperature of 0 is greedy.
        ``max_new_tokens`` caps first-stage tokens per chunk (default: until end of audio or
        the block is full). ``decoder``: ``"mbd"`` (multi-band diffusion) or ``"encodec"``.
        ``enhance``: DeepFilterNet3 (output at 48 kHz); ``normalize``: -14 LUFS.
        ``batch_size``: utterances (chunks) per device per batch, one int for every stage, a dict
        ``{"stage1", "stage2", "decoder"}``, or ``"auto"`` (largest that fit the free memory).
        ``utterance_ids``: the index of each text for its random key (default 0, 1, ...), so a
        text synthesised within any share of a list gets the same key as in the whole list.
        Returns one :class:`Speech` per text (a single one for a string).
        """
        if decoder not in ("mbd", "encodec"):
            raise SynthesisError(f"decoder must be 'mbd' or 'encodec', not {decoder!r}")
        if "encodec" not in self.components:
            raise SynthesisError(f"{self.model_dir} has no EnCodec codec (encodec_24khz-*.th): it cannot make audio")
        single = isinstance(text, str)
        sizes = self._batch_sizes(batch_size, decoder, max_new_tokens)
        normalised, embeddings, chunks = self._tokens(
            text, speaker, seed=seed, temperature=temperature, top_p=top_p, guidance_scale=guidance_scale,
            stage2_top_k=stage2_top_k, stage2_temperature=stage2_temperature, max_new_tokens=max_new_tokens,
            long_form=long_form, batch_size=sizes, utterance_ids=utterance_ids, progress=progress)
        self._decode(chunks, decoder, sizes["decoder"], progress)
        results = []
        for u, t in enumerate(normalised):
            mine = [c for c in chunks if c.utterance == u]
            wav = crossfade_join([c.wav for c in mine], self.sample_rate, CROSSFADE_SECONDS)
            results.append(self._finish(t, wav, embeddings[u], mine, normalize, enhance))
        return results[0] if single else results

    def tokens(self, text: Union[str, Sequence[str]], speaker=None, **options) -> Union[Speech, list[Speech]]:
        """Both GPT stages only: :class:`Speech` objects whose ``audio`` is empty (no codec needed).
        Takes :meth:`synthesize`'s sampling, chunking and batching options."""
        single = isinstance(text, str)
        normalised, embeddings, chunks = self._tokens(text, speaker, **options)
        results = []
        for u, t in enumerate(normalised):
            mine = [c for c in chunks if c.utterance == u]
            results.append(Speech(t, np.zeros(0, np.float32), self.sample_rate, np.asarray(embeddings[u], np.float32),
                                  np.concatenate([c.first_stage for c in mine], axis=1),
                                  np.concatenate([c.all_codebooks for c in mine], axis=1), [c.report for c in mine]))
        return results[0] if single else results

    def _tokens(self, text, speaker, *, seed=0, temperature=1.0, top_p=DEFAULT_TOP_P, guidance_scale=DEFAULT_GUIDANCE,
                stage2_top_k=DEFAULT_STAGE2_TOP_K, stage2_temperature=DEFAULT_STAGE2_TEMPERATURE, max_new_tokens=None,
                long_form=True, batch_size=DEFAULT_BATCH_SIZE, utterance_ids=None, progress=False):
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise SynthesisError("no text given")
        if utterance_ids is not None and len(utterance_ids) != len(texts):
            raise SynthesisError(f"got {len(utterance_ids)} utterance ids for {len(texts)} texts")
        if not temperature >= 0:
            raise SynthesisError("temperature must be >= 0")
        if not stage2_temperature >= 0:
            raise SynthesisError("stage2_temperature must be >= 0")
        if top_p is not None and not (0 < top_p <= 1):
            raise SynthesisError("top_p must be in (0, 1]")
        if max_new_tokens is not None and max_new_tokens < 2:
            raise SynthesisError("max_new_tokens must be >= 2 (two tokens per audio frame)")
        sizes = batch_size if isinstance(batch_size, dict) else self._batch_sizes(batch_size, None, max_new_tokens)
        self.last_timings = {}
        normalised = []
        for i, t in enumerate(texts):
            try:
                n = normalize_text(t)
            except TextError as exc:
                raise SynthesisError(f"text {i + 1}: {exc}" if len(texts) > 1 else str(exc)) from None
            if not n:
                raise SynthesisError(f"text {i + 1} is empty" if len(texts) > 1 else "text is empty")
            normalised.append(n)
        with _Timer(self.last_timings, "speaker"):
            embeddings = self._speakers(speaker, len(texts))
        ids = list(range(len(texts))) if utterance_ids is None else list(utterance_ids)
        keys = np.asarray(utterance_keys(seed, max(ids) + 1))[ids]

        chunks: list[_Chunk] = []
        for u, (t, key) in enumerate(zip(normalised, keys)):
            pieces = self.plan(t, max_new_tokens) if long_form else [t]
            for j, piece in enumerate(pieces):
                chunks.append(_Chunk(u, j, (j,), piece, np.asarray(jax.random.fold_in(key, j))))
            if len(pieces) > 1:
                log.info("text %d: %d chunks of %s characters", u + 1, len(pieces), ", ".join(str(len(p)) for p in pieces))

        sampling = SamplingConfig(guidance=guidance_scale, temperature=temperature, top_p=top_p)
        todo = chunks
        done: list[_Chunk] = []
        for attempt in range(MAX_RESPLITS + 1):
            with _Timer(self.last_timings, "stage1"):
                self._first_stage(todo, embeddings, sampling, max_new_tokens, sizes["stage1"], progress)
            retry = []
            for c in todo:
                overflow = c.report.hit_block_end or c.report.stage2_cut
                halves = split_in_two(c.text) if (overflow and long_form and attempt < MAX_RESPLITS) else [c.text]
                if len(halves) == 1:
                    done.append(c)
                    continue
                log.info("chunk of %d characters overflowed a block; splitting it in two", len(c.text))
                for h, half in enumerate(halves):
                    retry.append(_Chunk(c.utterance, c.index, c.order + (h,), half,
                                        np.asarray(jax.random.fold_in(c.key, h + 1))))
            if not retry:
                break
            todo = retry
        chunks = sorted(done, key=lambda c: (c.utterance, c.order))
        for c in chunks:
            if c.report.hit_block_end or c.report.stage2_cut:
                warnings.warn(f"text {c.utterance + 1}: a chunk filled the model's block and its speech is cut short: "
                              f"{c.text[:60]!r}", BlockFullWarning, stacklevel=2)

        with _Timer(self.last_timings, "stage2"):
            self._second_stage(chunks, embeddings, stage2_temperature, stage2_top_k, sizes["stage2"], progress)
        return normalised, embeddings, chunks

    def _batch_sizes(self, batch_size, decoder, max_new_tokens) -> dict:
        """Per-stage batch sizes (per device) from an int, a dict or ``"auto"`` (see :mod:`mvjax.throughput`)."""
        if isinstance(batch_size, dict):
            sizes = dict(batch_size)
        elif batch_size == "auto":
            from mvjax.throughput import plan_batch_sizes

            frames = self.config2.block_size if max_new_tokens is None else max(1, max_new_tokens // 2)
            sizes = plan_batch_sizes(self, frames=frames, decoder=decoder or "encodec")
            log.info("batch sizes per device (from free memory): %s", sizes)
        elif isinstance(batch_size, int) and not isinstance(batch_size, bool):
            sizes = {"stage1": batch_size, "stage2": batch_size, "decoder": batch_size}
        else:
            raise SynthesisError(f"batch_size must be a positive integer, a per-stage dict or 'auto', not {batch_size!r}")
        if set(sizes) != {"stage1", "stage2", "decoder"} or any(not isinstance(v, int) or v < 1 for v in sizes.values()):
            raise SynthesisError(f"batch sizes must be positive integers for stage1, stage2 and decoder, got {sizes}")
        return sizes

    def _speakers(self, speaker, count: int) -> np.ndarray:
        if speaker is None:
            raise SynthesisError("a speaker reference (audio file or embedding) is required")
        if isinstance(speaker, (list,)) and not isinstance(speaker, np.ndarray):
            if len(speaker) != count:
                raise SynthesisError(f"got {len(speaker)} speakers for {count} texts")
            cache: dict = {}
            out = []
            for s in speaker:
                k = str(s) if isinstance(s, (str, os.PathLike)) else id(s)
                if k not in cache:
                    cache[k] = self.speaker_embedding(s)
                out.append(cache[k])
            return np.stack(out)
        if isinstance(speaker, np.ndarray) and speaker.ndim == 2:
            if speaker.shape[0] != count:
                raise SynthesisError(f"got {speaker.shape[0]} speaker embeddings for {count} texts")
            return np.stack([self.speaker_embedding(s) for s in speaker])
        emb = self.speaker_embedding(speaker)
        return np.broadcast_to(emb, (count,) + emb.shape).copy()

    def _batches(self, items: list, batch_size: int, progress: bool, desc: str):
        from mvjax.parallel import device_count

        size = max(1, batch_size) * device_count(self.mesh) if self.mesh is not None else batch_size
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        if not (progress and batches):
            return batches
        return _counted(batches, len(items), desc)

    def _first_stage(self, chunks, embeddings, sampling, max_new_tokens, batch_size, progress):
        for c in chunks:
            c.prompt = self.tokenizer1.encode(c.text)
            c.stage2_text = self.tokenizer2.encode(c.text)
        # Similar prompt lengths share a bucket; results do not depend on the packing.
        ordered = sorted(chunks, key=lambda c: len(c.prompt))
        for batch in self._batches(ordered, batch_size, progress, "stage 1"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BlockFullWarning)  # reported per chunk below
                result = self.first_stage.generate(
                    [c.prompt for c in batch],
                    embeddings[[c.utterance for c in batch]],
                    np.stack([np.asarray(jax.random.fold_in(c.key, _STAGE1)) for c in batch]),
                    sampling,
                    max_new_tokens=max_new_tokens,
                    pad_to=_next_pow2(len(batch)),
                )
            for i, c in enumerate(batch):
                _, codebooks = split_first_stage_tokens(result.sequences[i], self.codebook_size)
                c.first_stage = codebooks
                frames = codebooks.shape[1]
                room = self.config2.block_size - len(c.stage2_text) - 1
                c.report = ChunkReport(
                    text=c.text, prompt_tokens=len(c.prompt), generated_tokens=int(len(result.generated(i))),
                    frames=min(frames, max(room, 0)), finished=bool(result.finished[i]),
                    hit_block_end=bool(result.hit_block_end[i]), stage2_cut=frames > room,
                )
                log.info("chunk %r: %d prompt tokens, %d generated, %d frames%s", c.text[:40], c.report.prompt_tokens,
                         c.report.generated_tokens, frames, " (block full)" if c.report.hit_block_end else "")

    def _second_stage(self, chunks, embeddings, temperature, top_k, batch_size, progress):
        for batch in self._batches(chunks, batch_size, progress, "stage 2"):
            inputs = np.stack([
                build_second_stage_input(c.stage2_text, c.first_stage, self.config2.block_size, self.stage2_pad) for c in batch
            ])
            keys = np.stack([np.asarray(jax.random.fold_in(c.key, _STAGE2)) for c in batch])
            pad = _next_pow2(len(batch))
            from mvjax.parallel import pad_rows

            predicted = self.second_stage.sample(
                pad_rows(inputs, pad), pad_rows(embeddings[[c.utterance for c in batch]], pad), pad_rows(keys, pad),
                temperature=temperature, top_k=top_k,
            )
            for i, c in enumerate(batch):
                c.all_codebooks = second_stage_codebooks(inputs[i], predicted[i], len(c.stage2_text), c.first_stage.shape[1])

    def _decode_latent(self, params, latent):
        from mvjax.nn import encodec as codec

        return codec.decode_latent(self.codec_config, params, latent)

    def _decode(self, chunks, decoder, batch_size, progress):
        empty = [c for c in chunks if c.all_codebooks.shape[1] == 0]
        for c in empty:
            c.wav = np.zeros((1, 0), np.float32)
        # Similar lengths share a padded size (and a compiled function).
        ordered = sorted((c for c in chunks if c.all_codebooks.shape[1] > 0), key=lambda c: c.all_codebooks.shape[1])
        desc = "diffusion" if decoder == "mbd" else "codec"
        for group in self._batches(ordered, batch_size, progress, desc):
            frames = diffusion_frames_bucket(max(c.all_codebooks.shape[1] for c in group))
            for batch in self._fitting(group, frames, decoder):
                self._decode_batch(batch, frames, decoder)

    def _fitting(self, batch: list, frames: int, decoder: str) -> list[list]:
        """``batch`` split into pieces whose diffusion working memory (attention included, see
        :func:`mvjax.throughput.diffusion_bytes_per_row`) fits in the free memory of a device. The
        padded length ``frames`` is shared by the pieces, so their noise and results do not change."""
        if decoder != "mbd" or len(batch) == 1:
            return [batch]
        from mvjax.parallel import device_count
        from mvjax.throughput import diffusion_bytes_per_row, rows_that_fit

        per_row = diffusion_bytes_per_row(self.diffusion, frames * self.codec_config.hop_length, frames)
        fit = rows_that_fit(per_row) * (device_count(self.mesh) if self.mesh is not None else 1)
        if fit < len(batch):
            log.info("diffusion: %d chunks of %d frames need ~%.1f GB; decoding %d at a time", len(batch), frames,
                     len(batch) * per_row / 1e9, fit)
        return [batch[i : i + fit] for i in range(0, len(batch), fit)]

    def _decode_batch(self, batch: list, frames: int, decoder: str) -> None:
        from mvjax.nn import encodec as codec
        from mvjax.parallel import pad_rows, padded_size, put_batch

        hop = self.codec_config.hop_length
        codes = np.stack([np.pad(c.all_codebooks, ((0, 0), (0, frames - c.all_codebooks.shape[1])), mode="edge")
                          for c in batch])
        rows = padded_size(_next_pow2(len(batch)), self.mesh)
        codes = pad_rows(codes, rows)
        with _Timer(self.last_timings, "codec"):
            latent = np.asarray(codec.codes_to_latent(self._codec_params, codes))
            wav_codec = np.asarray(self._codec_decode(self._codec_params, put_batch(latent, self.mesh)))
        with _Timer(self.last_timings, "diffusion" if decoder == "mbd" else "codec"):
            if decoder == "mbd":
                keys = pad_rows(np.stack([np.asarray(jax.random.fold_in(c.key, _DIFFUSION)) for c in batch]), rows)
                diffused = self.diffusion.generate(latent, wav_codec.shape, row_keys=keys)
            for i, c in enumerate(batch):
                n = c.all_codebooks.shape[1] * hop
                ref = wav_codec[i, :, :n]
                if decoder == "mbd":
                    from mvjax.diffusion import re_eq

                    c.wav = re_eq(diffused[i, :, :n], ref, self.sample_rate)
                else:
                    c.wav = ref.astype(np.float32)

    def _finish(self, text, wav, embedding, chunks, normalize, enhance) -> Speech:
        rate = self.sample_rate
        wav = np.asarray(wav, np.float32)
        if wav.shape[-1] > 0 and normalize:
            from mvjax.loudness import normalize_loudness

            with _Timer(self.last_timings, "loudness"):
                wav = normalize_loudness(wav, rate)
        if wav.shape[-1] > 0 and enhance:
            from mvjax.audio import resample
            from mvjax.enhance import DF_SAMPLE_RATE, DeepFilterNet3

            with _Timer(self.last_timings, "enhance"):
                if self._enhancer is None:
                    self._enhancer = DeepFilterNet3()
                wav = np.stack([self._enhancer.process_48k(resample(ch, rate, DF_SAMPLE_RATE)) for ch in wav])
            rate = DF_SAMPLE_RATE
        first = np.concatenate([c.first_stage for c in chunks], axis=1)
        codes = np.concatenate([c.all_codebooks for c in chunks], axis=1)
        return Speech(text, wav.reshape(-1).astype(np.float32), rate, np.asarray(embedding, np.float32), first, codes,
                      [c.report for c in chunks])

    def close(self) -> None:
        if self._enhancer is not None:
            self._enhancer.close()
            self._enhancer = None
