"""The continuous-batching first stage on every device: one :class:`FirstStageEngine` per device.

Why one engine per device rather than one engine whose slots are sharded along the mesh's data
axis: a slot never reads another slot's cache rows (attention is per row), so devices have
nothing to exchange while decoding; what each engine does on the host (admission into a free
slot, compaction of running slots into the first rows, a call over only the rows in use and a
window just long enough for its longest slot, retirement) is decided per device, from that
device's slots. One SPMD program over sharded slots would have to give every device the same
rows and window each call (the busiest device's), so a lightly loaded device would step as
slowly as the busiest, and every admission or compaction would touch a sharded buffer. The
weights are replicated either way; each engine's decoder uses its device's replica, no copy.

Admission: a request goes to the device with the most free slots (free slots less requests
already queued there; the lower device index on a tie), so load spreads evenly and no request
queues behind a busy device while another has room. Requests for which no device has room wait
here, and every engine then ends its call as soon as one of its slots frees up (as one engine
does for its own queue). A round steps the engines that have work in parallel, one host thread
each (JAX releases the GIL while a device computes). A request's tokens depend only on its key
and sampling values, never on which device or slots it shared (the engine's guarantee), so
they equal the tokens of one device.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import jax

from mvjax.inference.decode import FirstStageDecoder
from mvjax.inference.engine import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_SLOTS,
    EngineRequest,
    EngineResult,
    FirstStageEngine,
    run_to_end,
)
from mvjax.inference.options import DEFAULT_STEPS


def local_devices(mesh) -> list:
    """The devices of ``mesh`` this process drives, in mesh order."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


class DeviceEngines:
    """``slots`` slots on each local device of ``decoder``'s mesh, served as one engine (the interface of
    :class:`FirstStageEngine`: :meth:`submit`, :meth:`step`, :meth:`run`, ...). ``slots`` is per device,
    as a batch size is per device elsewhere; ``page_size``/``pages``: each device's engine keeps its KV
    cache in a pool of ``pages`` pages (see :class:`FirstStageEngine`)."""

    def __init__(self, decoder: FirstStageDecoder, slots: int = DEFAULT_SLOTS, steps: int = DEFAULT_STEPS,
                 prefill_chunk: Optional[int] = DEFAULT_PREFILL_CHUNK, page_size: Optional[int] = None,
                 pages: Optional[int] = None):
        if decoder.mesh is None:
            raise ValueError("DeviceEngines needs a decoder over a mesh; use FirstStageEngine on one device")
        self.devices = local_devices(decoder.mesh)
        self.engines = [FirstStageEngine(decoder.on_device(d), slots, steps, prefill_chunk, device=d,
                                         page_size=page_size, pages=pages)
                        for d in self.devices]
        self.decoder = decoder
        self.slots = slots * len(self.engines)
        self.steps = steps
        self._queue: collections.deque[EngineRequest] = collections.deque()
        self._pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="mvjax-engine")
        self.last_step_tokens = 0
        self.last_admitted = 0

    # --- what the scheduler reads ---

    @property
    def waiting(self) -> list[EngineRequest]:
        """Requests without a slot yet: queued here, then those queued on each device."""
        return list(self._queue) + [r for e in self.engines for r in e.waiting]

    @property
    def running(self) -> dict:
        """(device index, slot) -> (request, admitted) for every running request."""
        return {(i, slot): value for i, e in enumerate(self.engines) for slot, value in e.running.items()}

    @property
    def free_slots(self) -> int:
        return sum(e.free_slots for e in self.engines)

    @property
    def idle(self) -> bool:
        return not self._queue and all(e.idle for e in self.engines)

    @property
    def compile_count(self) -> int:
        return sum(e.compile_count for e in self.engines)

    @property
    def tokens_generated(self) -> int:
        return sum(e.tokens_generated for e in self.engines)

    @property
    def row_steps(self) -> int:
        return sum(e.row_steps for e in self.engines)

    @property
    def row_use(self) -> float:
        return self.tokens_generated / self.row_steps if self.row_steps else 0.0

    # --- requests in and out ---

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; it takes a slot on the least loaded device at the next :meth:`step` with room."""
        self.engines[0].check(request)
        self._queue.append(request)

    def _assign(self) -> None:
        while self._queue:
            room = [e.free_slots - len(e.waiting) for e in self.engines]
            best = max(range(len(room)), key=lambda i: (room[i], -i))
            if room[best] <= 0:
                return
            self.engines[best].waiting.append(self._queue.popleft())

    def step(self) -> list[EngineResult]:
        """Hand queued requests to devices with room, then one round on every device with work (in
        parallel); the results of all devices, in device order."""
        self._assign()
        busy = [e for e in self.engines if not e.idle]
        more = bool(self._queue)
        if len(busy) > 1:
            rounds = list(self._pool.map(lambda e: e.step(others_waiting=more), busy))
        else:
            rounds = [e.step(others_waiting=more) for e in busy]
        self.last_step_tokens = sum(e.last_step_tokens for e in busy)
        self.last_admitted = sum(e.last_admitted for e in busy)
        return [result for results in rounds for result in results]

    def partial(self, predicate) -> list[tuple[EngineRequest, object]]:
        return [item for e in self.engines for item in e.partial(predicate)]

    def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        """Decode ``requests`` to the end; results in request order."""
        return run_to_end(self, requests)

    def cancel(self, predicate) -> int:
        kept = collections.deque(r for r in self._queue if not predicate(r))
        dropped = len(self._queue) - len(kept)
        self._queue = kept
        return dropped + sum(e.cancel(predicate) for e in self.engines)

    def reset(self) -> None:
        self._queue.clear()
        for e in self.engines:
            e.reset()

    def release(self) -> None:
        for e in self.engines:
            e.release()

    def precompile(self, max_prompt: int = 128, max_window: Optional[int] = None) -> int:
        """Every engine's :meth:`FirstStageEngine.precompile`, in parallel; returns the functions compiled."""
        return sum(self._pool.map(lambda e: e.precompile(max_prompt, max_window), self.engines))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
