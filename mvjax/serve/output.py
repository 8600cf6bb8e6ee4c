"""A request's chunks -> the audio it answers with: crossfades, loudness, DeepFilterNet3, encoding.

Whole responses are finished exactly as :meth:`mvjax.TTS.synthesize` finishes a text (chunks
crossfaded, then -14 LUFS over the whole text, then enhancement at 48 kHz), so a server answer
equals the library's for the same tokens.

A stream cannot wait for the whole text: :class:`StreamAssembler` sends each chunk as it comes,
holding back only the crossfade's length for the next chunk (the joined stream equals the
library's crossfaded join sample for sample), applies one loudness gain to the whole stream
(measured on its first audible chunk, so there are no chunk-to-chunk jumps) and runs the
enhancer as a stream (its state and resampler carried across chunks).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import numpy as np

from mvjax.audio.features import StreamResampler
from mvjax.audio.loudness import apply_gain, loudness_gain_db
from mvjax.inference.longform import CROSSFADE_SECONDS, crossfade_join, equal_power_fade
from mvjax.inference.stages import finish_audio


class EnhancerPool:
    """Fresh DeepFilterNet3 states for the request threads. A state carries memory of the audio it
    has seen, so each request gets a new one (its audio then does not depend on earlier requests);
    creating one takes ~0.5 s, so up to ``spare`` are made ahead in a background thread."""

    def __init__(self, spare: int = 2):
        self.spare = spare
        self._free: list = []
        self._lock = threading.Lock()
        self._refilling = False
        self._closed = False

    @staticmethod
    def _new():
        from mvjax.audio.enhance import DeepFilterNet3

        return DeepFilterNet3()

    def _refill(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed or len(self._free) >= self.spare:
                        return
                enhancer = self._new()
                with self._lock:
                    if self._closed:
                        enhancer.close()
                        return
                    self._free.append(enhancer)
        finally:
            with self._lock:
                self._refilling = False

    def _start_refill(self) -> None:
        with self._lock:
            if self._refilling or self._closed:
                return
            self._refilling = True
        threading.Thread(target=self._refill, name="mvjax-enhancer-pool", daemon=True).start()

    @contextlib.contextmanager
    def get(self):
        with self._lock:
            enhancer = self._free.pop() if self._free else None
        if enhancer is None:
            enhancer = self._new()
        try:
            yield enhancer
        finally:
            enhancer.close()
            self._start_refill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for enhancer in self._free:
                enhancer.close()
            self._free.clear()


def finish_whole(pieces: list[np.ndarray], rate: int, normalize: bool, enhance: bool,
                 pool: Optional[EnhancerPool], out_rate: Optional[int] = None) -> np.ndarray:
    """Chunk waveforms (channels, samples) at the codec ``rate`` -> mono float32 at ``out_rate``
    (default: what the library gives, 48 kHz enhanced, else the codec's rate)."""
    from mvjax.audio.features import resample

    wav = crossfade_join(pieces, rate, CROSSFADE_SECONDS)
    if enhance:
        with pool.get() as enhancer:
            wav, got = finish_audio(wav, rate, normalize, enhancer, {})
    else:
        wav, got = finish_audio(wav, rate, normalize, None, {})
    wav = np.asarray(wav, np.float32).reshape(-1)
    return resample(wav, got, out_rate) if out_rate and out_rate != got else wav


class StreamAssembler:
    """Chunk waveforms in, audio ready to send out (mono float32 at :attr:`rate`).

    Call :meth:`add` per chunk and :meth:`end` once; use as a context manager so an enhancer
    state taken from ``pool`` goes back whatever happens."""

    def __init__(self, codec_rate: int, normalize: bool, enhance: bool, pool: Optional[EnhancerPool],
                 out_rate: Optional[int] = None, crossfade_s: float = CROSSFADE_SECONDS):
        from mvjax.audio.enhance import DF_SAMPLE_RATE

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
            from mvjax.audio.enhance import EnhanceStream

            self._context = self._pool.get()
            self._stream = EnhanceStream(self.codec_rate, self._context.__enter__())
        return self

    def __exit__(self, *exc):
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None

    def add(self, wav: np.ndarray) -> np.ndarray:
        piece = np.asarray(wav, np.float32)
        piece = piece.mean(axis=0) if piece.ndim > 1 else piece
        if piece.shape[0] == 0:
            return np.zeros(0, np.float32)
        # longform.crossfade_join's crossfade: as long as both neighbours allow (the held tail is
        # the crossfade's length unless the chunks are shorter than it).
        n = int(min(self.crossfade, self._length // 2, piece.shape[0] // 2, self._held.shape[0]))
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

