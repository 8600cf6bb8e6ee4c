"""How the two stages lay audio codes and text out in their token streams (adapters both ways)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def split_first_stage_tokens(tokens: Sequence[int], codebook_size: int) -> tuple[list[int], np.ndarray]:
    """First-stage stream -> (text ids, codebooks (2, frames)).

    The stream interleaves codebook 1 (ids ``[0, C)``) and codebook 2 (``[C, 2C)``,
    shifted down by C); ``2C`` is end of audio and ids above it are text. Text ids
    drop their final (end-of-text) id and both codebooks are cut to equal length,
    as the reference's flattened-interleaved adapter does.
    """
    c = codebook_size
    tokens = np.asarray(tokens, dtype=np.int64).ravel()
    first = tokens[tokens < c]
    second = tokens[(tokens >= c) & (tokens < 2 * c)] - c
    text = tokens[tokens > 2 * c]
    frames = min(first.size, second.size)
    return text[:-1].tolist(), np.stack([first[:frames], second[:frames]])


def tilted_decode(tokens: np.ndarray, pad_token: int) -> tuple[list[int], list[list[int]]]:
    """The reference second-stage output adapter, kept for parity checks.

    ``tokens`` (hierarchies, time). Hierarchy 0 yields text (ids above ``pad_token``)
    and audio (ids below it); other hierarchies yield every id below ``pad_token``.
    With an imperfect model this keeps predictions at text positions and misaligns
    codebooks: prefer :func:`second_stage_codebooks`.
    """
    tokens = np.asarray(tokens)
    text = [int(t) for t in tokens[0] if t > pad_token]
    audio = [[int(t) for t in tokens[0] if t < pad_token]]
    for row in tokens[1:]:
        audio.append([int(t) for t in row if t < pad_token])
    frames = min(len(a) for a in audio)
    return text[:-1], [a[:frames] for a in audio]


def build_second_stage_input(
    text_ids: Sequence[int], codebooks: np.ndarray, block_size: int, pad_token: int
) -> np.ndarray:
    """Second-stage input (2, block): text then codebook 1 then one pad; pads under the text then codebook 2 then one pad.

    Right-padded with ``pad_token`` to ``block_size`` (cut if longer), as the reference does.
    """
    codebooks = np.asarray(codebooks, dtype=np.int64)
    if codebooks.ndim != 2 or codebooks.shape[0] < 2:
        raise ValueError(f"expected codebooks of shape (2, frames), got {codebooks.shape}")
    text = np.asarray(text_ids, dtype=np.int64)
    pad1 = np.array([pad_token], np.int64)
    rows = [
        np.concatenate([text, codebooks[0], pad1]),
        np.concatenate([np.full(text.size, pad_token, np.int64), codebooks[1], pad1]),
    ]
    out = np.full((2, block_size), pad_token, np.int64)
    n = min(block_size, rows[0].size)
    for i, row in enumerate(rows):
        out[i, :n] = row[:n]
    return out


def second_stage_codebooks(
    stage2_input: np.ndarray, predicted: np.ndarray, num_text_tokens: int, num_frames: int
) -> np.ndarray:
    """All codebooks (2 + heads, frames') read at the audio positions of the second-stage block.

    ``stage2_input`` (2, block) supplies codebooks 1-2, ``predicted`` (heads, block)
    the rest; frames past the block are cut.
    """
    stacked = np.concatenate([np.asarray(stage2_input)[:2], np.asarray(predicted)], axis=0)
    start = num_text_tokens
    stop = min(start + num_frames, stacked.shape[1])
    return stacked[:, start:stop].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where audio codes sit in the two stages' vocabularies, read from their tokenizers' offsets.

    First stage: codebook 1 at ``0 .. C-1``, codebook 2 at ``C .. 2C-1``, end of audio at ``2C``,
    text from ``offset = 2C + 1``. Second stage: codes ``0 .. C-1``, pad / end of audio ``C``,
    text from ``offset = C + 1``.
    """

    codebook_size: int
    end_of_audio: int  # first stage
    stage2_pad: int

    @classmethod
    def from_offsets(cls, first_stage_offset: int, second_stage_offset: int) -> "TokenLayout":
        return cls(codebook_size=(first_stage_offset - 1) // 2, end_of_audio=first_stage_offset - 1,
                   stage2_pad=second_stage_offset - 1)
