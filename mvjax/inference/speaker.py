"""Speaker embeddings from a reference recording (zero-shot voice cloning).

    encoder = SpeakerEncoder.load("models/metavoice-1b")
    embedding = encoder.embed_file("voice.wav")        # (256,), unit norm, cached on disk

The pipeline is the reference's: load as mono float at 16 kHz (soxr HQ), trim leading and
trailing silence (top_db 20), zero-pad to whole partials, power mel spectrogram (25 ms
window, 10 ms hop, 40 Slaney mels), 160-frame partials every round(16000 / 1.3 / 160)
frames (the last one dropped when it covers under 75 % and others exist), LSTM encoder per
partial, mean, L2 normalisation.

Unlike the reference, which keys its embedding cache by file path, the on-disk cache is
keyed by the audio file's *content* and the encoder weights, so an edited file is never
served a stale embedding. References shorter than 30 s are accepted with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from mvjax.audio.features import mel_power_spectrogram, resample, trim_silence
from mvjax.audio.io import AudioError, load_audio, to_mono
from mvjax.core.atomic import atomic_path
from mvjax.core.paths import cache_root
from mvjax.inference.options import SynthesisError
from mvjax.io.checkpoint import load_speaker_encoder
from mvjax.nn.speaker_encoder import SpeakerEncoderConfig, embed_partials

RECOMMENDED_SECONDS = 30.0
CACHE_VERSION = 1


class ShortReferenceWarning(UserWarning):
    """The reference recording is shorter than the 30 s the model was built for."""


def partial_slices(n_samples: int, cfg: SpeakerEncoderConfig) -> list[tuple[int, int]]:
    """Mel-frame ranges [start, stop) of the partial utterances covering ``n_samples``."""
    hop = cfg.hop_length
    n_frames = int(np.ceil((n_samples + 1) / hop))
    frame_step = int(np.round((cfg.sample_rate / cfg.partial_rate) / hop))
    steps = max(1, n_frames - cfg.partial_frames + frame_step + 1)
    slices = [(i, i + cfg.partial_frames) for i in range(0, steps, frame_step)]
    last_start, last_stop = slices[-1][0] * hop, slices[-1][1] * hop
    coverage = (n_samples - last_start) / (last_stop - last_start)
    if coverage < cfg.min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices


@dataclasses.dataclass
class UtteranceEmbedding:
    embedding: np.ndarray  # (E,) unit norm
    partial_embeddings: np.ndarray  # (P, E)
    mels: np.ndarray  # (P, partial_frames, n_mels)
    slices: list[tuple[int, int]]


class SpeakerEncoder:
    def __init__(self, config: SpeakerEncoderConfig, params, weights_digest: str = "", cache_dir: Optional[Path] = None):
        self.config = config
        self.params = params
        self.weights_digest = weights_digest
        self.cache_dir = cache_dir

    @classmethod
    def load(cls, model_dir: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = "default") -> "SpeakerEncoder":
        config, params, digest = load_speaker_encoder(model_dir)
        if cache_dir == "default":
            cache_dir = cache_root() / "speaker_embeddings"
        return cls(config, params, digest, None if cache_dir is None else Path(cache_dir))

    # --- Signal path --------------------------------------------------------------------
    def preprocess(self, audio: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
        """(mono or (channels, n) audio, rate) -> (16 kHz mono, trimmed)."""
        cfg = self.config
        audio = np.asarray(audio, np.float32)
        if audio.size == 0:
            raise AudioError("the reference audio is empty")
        if not np.all(np.isfinite(audio)):
            raise AudioError("the reference audio holds non-finite samples (NaN or infinity)")
        wav = resample(to_mono(audio), rate, cfg.sample_rate)
        trimmed, _ = trim_silence(wav, top_db=cfg.trim_top_db)
        return wav, trimmed

    def embed_utterance(self, wav: np.ndarray) -> UtteranceEmbedding:
        """Embedding of trimmed 16 kHz mono audio."""
        cfg = self.config
        slices = partial_slices(len(wav), cfg)
        needed = slices[-1][1] * cfg.hop_length
        if needed >= len(wav):
            wav = np.pad(wav, (0, needed - len(wav)))
        mel = mel_power_spectrogram(wav, cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.input_size)
        mels = np.stack([mel[a:b] for a, b in slices])
        partials = np.asarray(embed_partials(self.params, mels))
        mean = partials.mean(axis=0)
        return UtteranceEmbedding(mean / np.linalg.norm(mean), partials, mels, slices)

    def embed_audio(self, audio: np.ndarray, rate: int) -> np.ndarray:
        _, trimmed = self.preprocess(audio, rate)
        seconds = len(trimmed) / self.config.sample_rate
        if seconds < RECOMMENDED_SECONDS:
            warnings.warn(
                f"the reference voice has {seconds:.1f} s of speech after trimming silence; "
                f"cloning works best with {RECOMMENDED_SECONDS:.0f} s or more",
                ShortReferenceWarning,
                stacklevel=2,
            )
        return self.embed_utterance(trimmed).embedding

    def embed_file(self, path: str | os.PathLike, use_cache: bool = True) -> np.ndarray:
        """Embedding of an audio file, served from the content-keyed cache when possible."""
        path = Path(path)
        if not path.is_file():
            raise AudioError(f"speaker audio not found: {path}")
        cache_file = None
        if use_cache and self.cache_dir is not None:
            cache_file = self.cache_dir / f"{self.cache_key(path.read_bytes())}.npy"
            if cache_file.is_file():
                try:
                    cached = np.load(cache_file)
                    if cached.shape == (self.config.embedding_size,):
                        return cached
                except (OSError, ValueError):
                    pass  # a damaged entry is recomputed and replaced
        audio, rate = load_audio(path)
        embedding = self.embed_audio(audio, rate)
        if cache_file is not None:
            _atomic_save(cache_file, embedding)
        return embedding

    def cache_key(self, content: bytes) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"v": CACHE_VERSION, "weights": self.weights_digest, "cfg": self.config.to_dict()},
                            sort_keys=True).encode())
        h.update(hashlib.sha256(content).digest())
        return h.hexdigest()


def _atomic_save(path: Path, array: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array)
    except OSError as exc:  # a read-only cache must not break synthesis
        warnings.warn(f"could not write the speaker-embedding cache at {path.parent}: {exc}", stacklevel=3)


SpeakerSpec = Union[str, os.PathLike, np.ndarray, tuple]


def embedding_from_spec(spec: SpeakerSpec, encoder: Callable[[], "SpeakerEncoder"], size: Optional[int]) -> np.ndarray:
    """An embedding (E,) from an audio path, an ``(audio, rate)`` pair, an embedding array or a
    ``.npy`` path. ``encoder`` is called only when audio has to be embedded."""
    if isinstance(spec, tuple):
        audio, rate = spec
        emb = encoder().embed_audio(np.asarray(audio, np.float32), int(rate))
    elif isinstance(spec, np.ndarray):
        emb = np.asarray(spec, np.float32).reshape(-1)
    elif isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.suffix.lower() == ".npy":
            try:
                emb = np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
            except (OSError, ValueError) as exc:
                raise SynthesisError(f"cannot read speaker embedding {path}: {exc}") from None
        else:
            emb = encoder().embed_file(path)
    else:
        raise SynthesisError(f"speaker must be an audio path, (audio, rate) or an embedding array, not {type(spec).__name__}")
    if size is not None and emb.shape != (size,):
        raise SynthesisError(f"speaker embedding must have shape ({size},), got {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise SynthesisError("speaker embedding holds NaN or infinite values")
    return emb


def embeddings_for(spec, count: int, one: Callable[[SpeakerSpec], np.ndarray]) -> np.ndarray:
    """(count, E) embeddings: ``spec`` is one speaker for every text, a list of one per text, or a
    (count, E) array. ``one`` embeds a single spec; repeated paths are embedded once."""
    if spec is None:
        raise SynthesisError("a speaker reference (audio file or embedding) is required")
    if isinstance(spec, list):
        if len(spec) != count:
            raise SynthesisError(f"got {len(spec)} speakers for {count} texts")
        seen: dict = {}
        for s in spec:
            k = str(s) if isinstance(s, (str, os.PathLike)) else id(s)
            if k not in seen:
                seen[k] = one(s)
        return np.stack([seen[str(s) if isinstance(s, (str, os.PathLike)) else id(s)] for s in spec])
    if isinstance(spec, np.ndarray) and spec.ndim == 2:
        if spec.shape[0] != count:
            raise SynthesisError(f"got {spec.shape[0]} speaker embeddings for {count} texts")
        return np.stack([one(s) for s in spec])
    emb = one(spec)
    return np.broadcast_to(emb, (count,) + emb.shape).copy()
