"""Long-form text: split into chunks that fit the model's blocks, and join their audio.

The first stage holds prompt + 2 tokens per audio frame in its block (2048 released, about
13 s of speech) and the second stage holds text + frames + 1 in its own block, so a text
longer than that is spoken in chunks. Text is split at sentence ends, then (for a sentence
that alone is too long) at clause punctuation, then between words; chunks are packed
greedily up to the budget. Nothing is dropped: joining the chunks' words gives the text's
words back (:func:`plan_chunks` checks this). The chunks' waveforms are joined by
:func:`mvjax.audio.finish.crossfade_join`.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence

import numpy as np

# A sentence ends after . ! ? (optionally followed by closing quotes/brackets) and whitespace,
# unless the word before the dot is a common abbreviation or a single letter (initials).
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig", "approx", "inc",
    "ltd", "co", "mt", "gen", "col", "lt", "sgt", "capt", "rev", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec",
}
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+|\s+(?=-\s)")


def _sentence_ends(text: str):
    """Where each sentence of ``text`` ends (after the whitespace that follows its punctuation)."""
    start = 0
    for match in _SENTENCE_END.finditer(text):
        candidate = text[start:match.start()].rstrip()
        last_word = candidate.split()[-1] if candidate.split() else ""
        stem = last_word.rstrip(".!?\"')]").lower()
        if last_word.endswith(".") and (stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())):
            continue
        start = match.end()
        yield start


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (punctuation kept with its sentence)."""
    pieces, start = [], 0
    for end in _sentence_ends(text):
        pieces.append(text[start:end].strip())
        start = end
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def complete_sentences(text: str) -> tuple[str, str]:
    """(the complete sentences at the start of ``text``, stripped; the rest) for text that arrives in
    pieces: a sentence is complete once whitespace follows its end (so "3." may still become "3.5")."""
    end = 0
    for end in _sentence_ends(text):
        pass
    return text[:end].strip(), text[end:]


def split_clauses(sentence: str) -> list[str]:
    """Clauses of a sentence, split after , ; : and around spaced dashes."""
    return [p.strip() for p in _CLAUSE_END.split(sentence) if p.strip()]


def _pack(units: Sequence[str], fits: Callable[[str], bool], refine: Callable[[str], list[str]] | None) -> list[str]:
    """Greedily join consecutive units into chunks that ``fits``; a unit too long alone is refined."""
    chunks: list[str] = []
    current = ""
    for unit in units:
        candidate = f"{current} {unit}" if current else unit
        if fits(candidate):
            current = candidate
            continue
        if current:
            chunks.append(current)
            current = ""
        if fits(unit) or refine is None:
            current = unit
        else:
            parts = refine(unit)
            chunks.extend(parts[:-1])
            current = parts[-1]
    if current:
        chunks.append(current)
    return chunks


def plan_chunks(text: str, fits: Callable[[str], bool]) -> list[str]:
    """Split normalised ``text`` into chunks each of which ``fits`` (a single word always counts as fitting).

    Sentences are packed together while they fit; a sentence too long alone is split into
    clauses, a clause too long alone into words.
    """
    if fits(text):
        return [text]

    def by_words(clause: str) -> list[str]:
        return _pack(clause.split(), fits, None)

    def by_clauses(sentence: str) -> list[str]:
        return _pack(split_clauses(sentence), fits, by_words)

    chunks = _pack(split_sentences(text), fits, by_clauses)
    if " ".join(chunks).split() != text.split():  # never drop or reorder a word
        raise AssertionError("chunking lost words")
    return chunks


def split_in_two(text: str) -> list[str]:
    """Split a chunk into two halves at the most central sentence, clause or word boundary."""
    for splitter in (split_sentences, split_clauses, str.split):
        units = splitter(text)
        if len(units) > 1:
            lengths = np.cumsum([len(u) + 1 for u in units])
            cut = int(np.argmin(np.abs(lengths[:-1] - lengths[-1] / 2))) + 1
            return [" ".join(units[:cut]), " ".join(units[cut:])]
    return [text]


# Speaking rate used to budget chunks: slow English speech, so real speech rarely runs longer.
CHARS_PER_SECOND = 12.0
# How often a chunk that still overflows a block is split in two and spoken again.
MAX_RESPLITS = 4


def chunk_capacity(text: str, tokenizers, block_sizes: tuple[int, int], frame_rate: float,
                   max_new_tokens: Optional[int] = None) -> tuple[int, int]:
    """(estimated frames, frames both blocks leave room for) for one chunk of normalised text.

    The first stage spends two tokens per frame after its prompt; the second stage one position
    per frame after its text. The estimate is the speaking-rate budget, or ``max_new_tokens // 2``
    when that is smaller."""
    n1, n2 = (len(tok.encode(text)) for tok in tokenizers)
    capacity = min((block_sizes[0] - n1) // 2 - 1, block_sizes[1] - n2 - 1)
    estimate = math.ceil(len(text) / CHARS_PER_SECOND * frame_rate)
    if max_new_tokens is not None:
        estimate = min(estimate, max_new_tokens // 2)
    return estimate, capacity


def plan_for_model(text: str, tokenizers, block_sizes: tuple[int, int], frame_rate: float,
                   max_new_tokens: Optional[int] = None) -> list[str]:
    """Chunks of normalised ``text`` that each fit both stages' blocks (:func:`plan_chunks`)."""

    def fits(chunk: str) -> bool:
        estimate, capacity = chunk_capacity(chunk, tokenizers, block_sizes, frame_rate, max_new_tokens)
        return estimate <= capacity

    return plan_chunks(text, fits)
