"""Chunk waveforms -> finished audio: equal-power crossfades, -14 LUFS loudness, DeepFilterNet3.

A text spoken in chunks is finished whole (:func:`finish_whole`: chunks crossfaded, then loudness
over the whole text, then enhancement at 48 kHz; :meth:`mvjax.TTS.synthesize` finishes the same
way, so a server answer equals the library's for the same tokens) or as a stream.

A stream cannot wait for the whole text: :class:`StreamAssembler` sends each chunk as it comes,
holding back only the crossfade's length for the next chunk (the joined stream equals
:func:`crossfade_join` sample for sample), applies one loudness gain to the whole stream
(measured on its first audible chunk, so there are no chunk-to-chunk jumps) and runs the
enhancer as a stream (its state and resampler carried across chunks).

Enhancer states come from a ``pool``: any object whose ``get()`` is a context manager yielding a
fresh DeepFilterNet3 (the server's :class:`mvjax.serve.output.EnhancerPool`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional, Sequence

import numpy as np

from mvjax.audio.enhance import DF_SAMPLE_RATE, EnhanceStream
from mvjax.audio.features import StreamResampler, resample
from mvjax.audio.loudness import apply_gain, loudness_gain_db, normalize_loudness

# Length of the crossfade between consecutive chunks' waveforms.
CROSSFADE_SECONDS = 0.05


def crossfade_join(pieces: Sequence[np.ndarray], rate: int, crossfade_s: float = CROSSFADE_SECONDS) -> np.ndarray:
    """Concatenate waveforms (..., samples) with equal-power crossfades of ``crossfade_s``
    (shortened to half of the shorter neighbour when needed)."""
    pieces = [np.asarray(p, np.float32) for p in pieces]
    if not pieces:
        raise ValueError("nothing to join")
    out = pieces[0]
    for piece in pieces[1:]:
        n = int(min(round(crossfade_s * rate), out.shape[-1] // 2, piece.shape[-1] // 2))
        if n <= 0:
            out = np.concatenate([out, piece], axis=-1)
            continue
        out = np.concatenate([out[..., :-n], equal_power_fade(out[..., -n:], piece[..., :n]), piece[..., n:]], axis=-1)
    return out


def equal_power_fade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """``tail`` faded out into ``head`` (equally long, (..., n)) with cos/sin gains, float32."""
    n = tail.shape[-1]
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return (tail * np.cos(t * np.pi / 2) + head * np.sin(t * np.pi / 2)).astype(np.float32)


@contextlib.contextmanager
def _timed(timings: Optional[dict], name: str):
    """Adds the wall time of the ``with`` block to ``timings[name]`` (nothing when ``timings`` is None)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def finish_audio(wav: np.ndarray, rate: int, normalize: bool, enhancer,
                 timings: Optional[dict] = None) -> tuple[np.ndarray, int]:
    """(channels, samples) -> loudness-normalised (-14 LUFS) and, with an ``enhancer`` (DeepFilterNet3),
    cleaned at 48 kHz; returns the audio and its rate. Seconds spent are added to ``timings``
    under "loudness" and "enhance"."""
    wav = np.asarray(wav, np.float32)
    if wav.shape[-1] > 0 and normalize:
        with _timed(timings, "loudness"):
            wav = normalize_loudness(wav, rate)
    if wav.shape[-1] > 0 and enhancer is not None:
        with _timed(timings, "enhance"):
            wav = np.stack([enhancer.process_48k(resample(ch, rate, DF_SAMPLE_RATE)) for ch in wav])
        rate = DF_SAMPLE_RATE
    return wav, rate


def finish_whole(pieces: list[np.ndarray], rate: int, normalize: bool, enhance: bool,
                 pool, out_rate: Optional[int] = None) -> np.ndarray:
    """Chunk waveforms (channels, samples) at the codec ``rate`` -> mono float32 at ``out_rate``
    (default: what the library gives, 48 kHz enhanced, else the codec's rate)."""
    wav = crossfade_join(pieces, rate, CROSSFADE_SECONDS)
    if enhance:
        with pool.get() as enhancer:
            wav, got = finish_audio(wav, rate, normalize, enhancer)
    else:
        wav, got = finish_audio(wav, rate, normalize, None)
    wav = np.asarray(wav, np.float32).reshape(-1)
    return resample(wav, got, out_rate) if out_rate and out_rate != got else wav


class StreamAssembler:
    """Chunk waveforms in, audio ready to send out (mono float32 at :attr:`rate`).

    Call :meth:`add` per chunk and :meth:`end` once; use as a context manager so an enhancer
    state taken from ``pool`` goes back whatever happens."""

    def __init__(self, codec_rate: int, normalize: bool, enhance: bool, pool,
                 out_rate: Optional[int] = None, crossfade_s: float = CROSSFADE_SECONDS):
        self.codec_rate = codec_rate
        made = DF_SAMPLE_RATE if enhance else codec_rate
        self.rate = out_rate or made
        self._resampler = StreamResampler(made, self.rate) if self.rate != made else None
        self.normalize = normalize
        self.crossfade = int(round(crossfade_s * codec_rate))
        self._held = np.zeros(0, np.float32)  # the end of the audio so far, kept for the next crossfade
        self._length = 0  # samples joined so far (sent + held)
        self._gain_db: Optional[float] = None
        self._enhance = enhance
        self._pool = pool
        self._context = None
        self._stream = None

    def __enter__(self):
        if self._enhance:
            self._context = self._pool.get()
            self._stream = EnhanceStream(self.codec_rate, self._context.__enter__())
        return self

    def __exit__(self, *exc):
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None

    def add(self, wav: np.ndarray, continues: bool = False) -> np.ndarray:
        """The audio ready to send after ``wav``: a chunk's waveform, crossfaded onto the previous
        chunk, or (``continues``) the next samples of the chunk being streamed, joined as they are."""
        piece = np.asarray(wav, np.float32)
        piece = piece.mean(axis=0) if piece.ndim > 1 else piece
        if piece.shape[0] == 0:
            return np.zeros(0, np.float32)
        # crossfade_join's crossfade: as long as both neighbours allow (the held tail is the
        # crossfade's length unless the chunks are shorter than it).
        n = 0 if continues else int(min(self.crossfade, self._length // 2, piece.shape[0] // 2, self._held.shape[0]))
        if n > 0:
            joined = np.concatenate([self._held[:-n], equal_power_fade(self._held[-n:], piece[:n]), piece[n:]])
        else:
            joined = np.concatenate([self._held, piece])
        self._length += piece.shape[0] - n
        keep = min(self.crossfade, joined.shape[0])
        ready, self._held = joined[: joined.shape[0] - keep], joined[joined.shape[0] - keep:]
        return self._out(ready, measure=piece)

    def end(self) -> np.ndarray:
        out = self._out(self._held, measure=self._held, final=True)
        self._held = np.zeros(0, np.float32)
        if self._stream is not None:
            out = np.concatenate([out, self._stream.flush()])
        if self._resampler is not None:
            out = self._resampler(out, last=True)
        return out

    def _out(self, audio: np.ndarray, measure: np.ndarray, final: bool = False) -> np.ndarray:
        if self.normalize:
            if self._gain_db is None:  # the first audible chunk sets the whole stream's gain
                self._gain_db = loudness_gain_db(measure[None], self.codec_rate)
            if self._gain_db is not None:
                audio = apply_gain(audio, self._gain_db)
        if self._stream is not None:
            audio = self._stream.process(audio)
        if self._resampler is not None and not final:
            audio = self._resampler(audio)
        return audio
