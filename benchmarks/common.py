"""What every benchmark shares: the model shapes it builds, wall time of a call, and this process's memory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

# First-stage GPT shapes of the benchmarks' random models: the released MetaVoice-1B first stage
# (1.2B parameters), a medium one and the shared fixture's tiny one. The rest of the architecture
# and the vocabulary are the released first stage's.
FIRST_STAGE_SHAPES = {
    "tiny": dict(block_size=256, n_layer=2, n_head=4, n_embd=64),
    "medium": dict(block_size=2048, n_layer=12, n_head=16, n_embd=1024),
    "released": dict(block_size=2048, n_layer=24, n_head=16, n_embd=2048),
}
FIRST_STAGE_VOCAB = 2562  # two codebooks of 1024, end of audio, a tokenizer of 512 tokens
# The released second stage (``convert_weights.random_checkpoints.model_args`` keywords).
RELEASED_SECOND_STAGE = dict(block_size=1024, vocab_sizes=[1538, 1025], target_vocab_sizes=[1025] * 6, n_layer=6,
                             n_head=6, n_embd=384, causal=False, norm_type="layernorm", nonlinearity_type="gelu")


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
