"""What every benchmark measures the same way: wall time of a call, and this process's memory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable


def clock(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call; JAX results are waited for, so asynchronous dispatch counts."""
    import jax

    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def best_of(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """(fastest of ``repeats`` calls, the last result)."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        seconds, out = clock(fn)
        best = min(best, seconds)
    return best, out


def proc_status() -> dict:
    """VmRSS and VmHWM of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def memory_mb() -> dict:
    """VmRSS and VmHWM of this process in MiB."""
    return {key: value / 2**20 for key, value in proc_status().items()}
