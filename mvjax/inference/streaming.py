"""A text spoken as a stream in the library: :class:`SpeechStream` yields audio as the scheduler makes it.

``for piece in tts.stream("Hello there.", speaker="voice.wav"): play(piece)``. The text's
utterance is streamed: its chunks run one at a time, and with :class:`~mvjax.inference.options.StreamSettings`
(``lookahead`` not None) audio within a chunk is sent every few frames while its first stage still
decodes. Pieces are finished as the server finishes a stream (:class:`~mvjax.audio.finish.StreamAssembler`:
crossfades between chunks, one loudness gain, DeepFilterNet3 run as a stream), mono float32 at
:attr:`SpeechStream.sample_rate`.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import numpy as np

from mvjax.audio.enhance import DeepFilterNet3
from mvjax.audio.finish import StreamAssembler
from mvjax.inference.options import SynthesisOptions
from mvjax.inference.scheduler import Piece, Scheduler, Utterance


class FreshEnhancers:
    """A new DeepFilterNet3 state per stream (a state remembers the audio it has seen)."""

    @contextlib.contextmanager
    def get(self):
        enhancer = DeepFilterNet3()
        try:
            yield enhancer
        finally:
            enhancer.close()


class SpeechStream:
    """Iterate for audio pieces (mono float32 at :attr:`sample_rate`); :attr:`first_audio_steps`
    counts the scheduler rounds until the first non-empty piece, :attr:`steps` all of them."""

    def __init__(self, scheduler: Scheduler, utterance: Utterance, options: SynthesisOptions, codec_rate: int):
        self.scheduler, self.utterance = scheduler, utterance
        self._queue: collections.deque = collections.deque()
        utterance.stream = True
        utterance.on_piece = self._piece
        utterance.deliver = self._chunks
        self._assembler = StreamAssembler(codec_rate, options.normalize, options.enhance, FreshEnhancers())
        self.sample_rate = self._assembler.rate
        self.first_audio_steps = None
        self.steps = 0

    def _piece(self, utterance: Utterance, piece: Piece) -> None:
        self._queue.append((piece.wav, piece.continues))

    def _chunks(self, utterance: Utterance, parts: list) -> None:
        self._queue.extend((c.wav, c.emitted > 0) for c in parts)
        utterance.chunks += parts

    def __iter__(self) -> Iterator[np.ndarray]:
        scheduler, steps = self.scheduler, 0
        scheduler.add(self.utterance)
        with self._assembler as assembler:
            try:
                while not scheduler.idle:
                    scheduler.step()
                    steps = self.steps = steps + 1
                    while self._queue:
                        out = assembler.add(*self._queue.popleft())
                        if out.size:
                            self.first_audio_steps = self.first_audio_steps or steps
                            yield out
                yield assembler.end()
            finally:
                scheduler.reset()
                scheduler.close()
