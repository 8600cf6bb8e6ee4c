"""mvjax: MetaVoice-1B text-to-speech in JAX/Flax, faithful to the released PyTorch weights.

    import mvjax

    tts = mvjax.TTS.load("models/metavoice-1b")     # converted dir, released checkpoints or hub id
    speech = tts.synthesize("Hello there.", speaker="voice.wav")
    speech.save("hello.wav")

The names below are the public API; they are imported on first use, so ``import mvjax`` is cheap.
Layers, bottom to top (each imports only those below it): :mod:`mvjax.core`, :mod:`mvjax.kernels`
and :mod:`mvjax.text`, :mod:`mvjax.nn` and :mod:`mvjax.audio`, :mod:`mvjax.io`, then the
converter package ``convert_weights``, :mod:`mvjax.sources`, :mod:`mvjax.inference`, :mod:`mvjax.cli`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TTS": "mvjax.inference.pipeline",
    "Speech": "mvjax.inference.speech",
    "ChunkReport": "mvjax.inference.speech",
    "SynthesisOptions": "mvjax.inference.options",
    "SynthesisError": "mvjax.inference.options",
    "SpeakerEncoder": "mvjax.inference.speaker",
    "FirstStageDecoder": "mvjax.inference.decode",
    "SecondStageSampler": "mvjax.inference.second_stage",
    "SamplingConfig": "mvjax.inference.options",
    "MultiBandDiffusion": "mvjax.inference.diffusion",
    "utterance_keys": "mvjax.inference.keys",
    "GPTConfig": "mvjax.nn.config",
    "Tokenizer": "mvjax.text.tokenizer",
    "normalize_text": "mvjax.text.tokenizer",
    "load_gpt_stage": "mvjax.io.checkpoint",
    "load_audio": "mvjax.audio.io",
    "MvjaxError": "mvjax.core.errors",
    "cache_root": "mvjax.core.paths",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mvjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
