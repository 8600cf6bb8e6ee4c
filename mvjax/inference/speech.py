"""What a synthesis returns: :class:`Speech` (audio, tokens, per-chunk reports) and how it is saved."""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np

from mvjax.audio.io import write_wav
from mvjax.core.atomic import atomic_path


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
    first_stage_codes: np.ndarray  # (2, frames): codebooks 1-2 from the first stage, chunks concatenated
    all_codebooks: np.ndarray  # (n_q, frames'): all codebooks the decoder used, chunks concatenated
    chunks: list[ChunkReport]

    @property
    def duration(self) -> float:
        return self.audio.shape[-1] / self.sample_rate

    @property
    def truncated(self) -> bool:
        return any(c.hit_block_end or c.stage2_cut for c in self.chunks)

    def save(self, path: str | os.PathLike, subtype: str = "PCM_16") -> None:
        """Write the audio in the format ``path``'s extension names (WAV, FLAC, OGG), atomically."""
        write_wav(path, self.audio, self.sample_rate, subtype=subtype)

    def save_tokens(self, path: str | os.PathLike) -> None:
        """``.npz`` with ``first_stage`` (2, F), ``all_codebooks`` (8, F), ``speaker_embedding`` (E,),
        ``chunk_frames`` and ``text`` (written atomically)."""
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **self.token_arrays())

    def tokens_npz(self) -> bytes:
        """The bytes :meth:`save_tokens` writes (for a worker that hands its results to a driver)."""
        buffer = io.BytesIO()
        np.savez(buffer, **self.token_arrays())
        return buffer.getvalue()

    def token_arrays(self) -> dict:
        return {
            "first_stage": self.first_stage_codes,
            "all_codebooks": self.all_codebooks,
            "speaker_embedding": self.speaker_embedding.astype(np.float32),
            "chunk_frames": np.array([c.frames for c in self.chunks], np.int64),
            "text": np.array(self.text),
        }
