"""The server's DeepFilterNet3 states: one fresh state per request, made ahead in a background thread.

Requests' chunks are finished by :mod:`mvjax.audio.finish` (whole or as a stream), which takes its
enhancer states from an :class:`EnhancerPool`.
"""

from __future__ import annotations

import contextlib
import threading

from mvjax.audio.enhance import DeepFilterNet3


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
