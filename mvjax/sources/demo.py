"""The demo model: random released-layout checkpoints (:func:`convert_weights.write_random_released`),
converted once into the cache, and a synthetic voice to clone.

    from mvjax.sources.demo import demo_model_dir, demo_speaker_audio
    model_dir = demo_model_dir()              # converted once, then reused from the cache
    audio, rate = demo_speaker_audio()        # ~4 s synthetic voice-like signal, 22.05 kHz

The model speaks noise: it only exercises the whole pipeline. :func:`build_model_dir` is the
builder behind it, for any writer of released checkpoints (the benchmarks' bigger random models).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.signal import lfilter

from convert_weights import check_seed, convert_released, write_random_released
from mvjax.core.paths import cache_root as default_root
from mvjax.io.checkpoint import ModelDirError, read_manifest

DEMO_VERSION = "v1"
SPEAKER_SAMPLE_RATE = 22050
# The components of a complete converted model.
COMPONENTS = ("first_stage", "second_stage", "speaker_encoder", "encodec", "mbd")


def _is_complete(model_dir: Path) -> bool:
    if not (model_dir / "manifest.json").is_file():
        return False
    try:
        components = read_manifest(model_dir).get("components", {})
    except (ModelDirError, OSError):
        return False
    return set(COMPONENTS) <= set(components) and all((model_dir / n / "config.json").is_file() for n in COMPONENTS)


@contextlib.contextmanager
def _build_lock(lock_path: Path):
    """Serialise concurrent builds of one cache entry (POSIX advisory lock; a no-op elsewhere)."""
    try:
        import fcntl  # inside the try: POSIX only
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_model_dir(out: str | os.PathLike, write_checkpoints: Callable[[Path], object], description: str,
                    log: Callable[[str], None] = lambda s: None) -> Path:
    """The converted model directory ``out``, built on first use: ``write_checkpoints(tmp)`` writes
    released-layout checkpoints into a temporary directory beside ``out``, which
    :func:`convert_weights.convert_released` converts (moving the result into place only when
    complete). A complete ``out`` is reused; concurrent builds of one ``out`` wait for each other.
    ``description`` names the model in the log line ("building the <description> in <out>").
    """
    out = Path(out)
    if _is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out.parent / f".{out.name}.lock"):
        if _is_complete(out):  # built by another process while we waited
            return out
        log(f"building the {description} in {out}")
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.src-", dir=out.parent) as tmp:
            write_checkpoints(Path(tmp))
            convert_released(tmp, out, log=log)
    return out


def demo_model_dir(cache_root: str | os.PathLike | None = None, seed: int = 0,
                   log: Callable[[str], None] = lambda s: None) -> Path:
    """A converted demo model directory: ``<cache_root>/demo/v1-seed<seed>``, built on first use
    (:func:`build_model_dir`).

    ``cache_root`` defaults to :func:`mvjax.core.paths.cache_root`.
    """
    seed = check_seed(seed)
    out = default_root(cache_root) / "demo" / f"{DEMO_VERSION}-seed{seed}"
    return build_model_dir(out, lambda tmp: write_random_released(tmp, seed),
                           f"random demo model (seed {seed})", log=log)


# --- Reference voice ----------------------------------------------------------------------

# (F1, F2, F3) in Hz of a few vowels of an adult voice.
_VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
           (660, 1720, 2410), (440, 1020, 2240), (390, 1990, 2550)]
_BANDWIDTHS = (80.0, 100.0, 140.0)


def _resonator(signal: np.ndarray, freq: float, bandwidth: float, rate: int) -> np.ndarray:
    """Two-pole resonance at ``freq`` with unit gain at 0 Hz."""
    r = np.exp(-np.pi * bandwidth / rate)
    a1, a2 = -2 * r * np.cos(2 * np.pi * freq / rate), r * r
    return lfilter([1 + a1 + a2], [1, a1, a2], signal)


def demo_speaker_audio(seed: int = 0, seconds: float = 4.0, rate: int = SPEAKER_SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """(float32 mono audio, sample rate): a synthetic voice-like reference recording.

    A glottal pulse train with a slowly wandering pitch (plus jitter), shaped by three
    formant resonances that change vowel every syllable, with short fricative-like noise
    between syllables, pauses between phrases and faint background noise. Deterministic
    in ``seed``; peak 0.5.
    """
    seed = check_seed(seed)
    rng = np.random.default_rng([seed, 100])
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    # Pitch: a base around 120 Hz, slow intonation, a random walk and cycle-to-cycle jitter.
    base = 105 + 30 * rng.random()
    walk = np.cumsum(rng.standard_normal(n)) / np.sqrt(rate) * 8
    f0 = base * (1 + 0.12 * np.sin(2 * np.pi * 0.6 * t + rng.uniform(0, 2 * np.pi))) + walk
    f0 = np.clip(f0 * (1 + 0.01 * rng.standard_normal(n)), 70, 300)
    phase = np.cumsum(f0 / rate)
    pulses = np.zeros(n)
    pulses[1:][np.diff(np.floor(phase)) > 0] = 1.0
    # Glottal flow (two leaky integrators) differentiated by lip radiation: about -6 dB/octave.
    source = lfilter([1.0], [1.0, -0.97], lfilter([1.0], [1.0, -0.97], pulses))
    source = np.diff(source, prepend=0.0)

    out = np.zeros(n)
    lead = int(0.25 * rate)
    pos = lead
    end = n - lead
    while pos < end:
        # A phrase of a few syllables, then a pause.
        for _ in range(int(rng.integers(3, 7))):
            length = int(rate * rng.uniform(0.12, 0.28))
            if pos + length > end:
                break
            seg = source[pos : pos + length]
            for formant, bw in zip(_VOWELS[int(rng.integers(len(_VOWELS)))], _BANDWIDTHS):
                seg = _resonator(seg, formant * rng.uniform(0.92, 1.08), bw, rate)
            envelope = np.sin(np.pi * np.linspace(0, 1, length)) ** 0.6
            out[pos : pos + length] += seg * envelope * rng.uniform(0.6, 1.0)
            pos += length
            gap = int(rate * rng.uniform(0.02, 0.07))
            if rng.random() < 0.5 and pos + gap < end:  # an unvoiced consonant: high-passed noise burst
                hiss = np.diff(rng.standard_normal(gap + 1)) * 0.05
                out[pos : pos + gap] += hiss * np.hanning(gap)
            pos += gap
        pos += int(rate * rng.uniform(0.2, 0.4))
    out /= np.max(np.abs(out)) + 1e-12
    out += 1e-3 * rng.standard_normal(n)  # room noise, far below the voice
    out *= 0.5 / np.max(np.abs(out))
    return out.astype(np.float32), rate
