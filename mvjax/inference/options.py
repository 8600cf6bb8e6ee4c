"""The options of a synthesis, checked once: sampling of both stages, chunking, batching."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Union

from mvjax.core.errors import MvjaxError
from mvjax.inference.decode import (
    DEFAULT_GUIDANCE,
    DEFAULT_TOP_P,
    SamplingConfig,
)
from mvjax.inference.engine import DEFAULT_STEPS
from mvjax.inference.second_stage import (
    DEFAULT_STAGE2_TEMPERATURE,
    DEFAULT_STAGE2_TOP_K,
)
from mvjax.text.tokenizer import TextError, normalize_text

DEFAULT_BATCH_SIZE = 8
BATCHING = ("engine", "static")


class SynthesisError(MvjaxError, ValueError):
    """Input the pipeline cannot synthesise (text, speaker, options). ``option``: the
    :class:`SynthesisOptions` field at fault, when one is (its message then starts with the name)."""

    def __init__(self, message: str, option: Optional[str] = None):
        super().__init__(message)
        self.option = option


@dataclasses.dataclass(frozen=True)
class SynthesisOptions:
    """Everything :meth:`mvjax.TTS.synthesize` takes besides texts and speakers; invalid values raise
    :class:`SynthesisError` on construction."""

    seed: int = 0
    temperature: float = 1.0  # first stage; 0 = greedy
    top_p: Optional[float] = DEFAULT_TOP_P
    guidance_scale: float = DEFAULT_GUIDANCE
    stage2_temperature: float = DEFAULT_STAGE2_TEMPERATURE
    stage2_top_k: Optional[int] = DEFAULT_STAGE2_TOP_K
    max_new_tokens: Optional[int] = None  # first-stage tokens per chunk
    long_form: bool = True
    batch_size: Union[int, dict, str] = DEFAULT_BATCH_SIZE
    # First-stage scheduling: "engine" (continuous batching, batch_size slots, engine_steps tokens
    # per call; one device) or "static" (batches of batch_size decoded to their longest row; any mesh).
    batching: str = "engine"
    engine_steps: int = DEFAULT_STEPS
    progress: bool = False

    def __post_init__(self):
        for name in ("temperature", "stage2_temperature", "guidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise SynthesisError(f"{name} must be a finite number >= 0, not {value!r}", name)
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise SynthesisError(f"top_p must be in (0, 1], not {self.top_p!r}", "top_p")
        if self.max_new_tokens is not None and self.max_new_tokens < 2:
            raise SynthesisError(f"max_new_tokens must be >= 2 (two tokens per audio frame), not {self.max_new_tokens!r}",
                                 "max_new_tokens")
        if self.batching not in BATCHING:
            raise SynthesisError(f"batching must be one of {', '.join(BATCHING)}, not {self.batching!r}", "batching")
        if isinstance(self.engine_steps, bool) or not isinstance(self.engine_steps, int) or self.engine_steps < 1:
            raise SynthesisError(f"engine_steps must be a positive integer, not {self.engine_steps!r}", "engine_steps")
        if self.stage2_top_k is not None and self.stage2_top_k < 0:
            raise SynthesisError(f"stage2_top_k must be >= 0 (0 = off), not {self.stage2_top_k!r}", "stage2_top_k")

    @property
    def first_stage_sampling(self) -> SamplingConfig:
        return SamplingConfig(guidance=self.guidance_scale, temperature=self.temperature, top_p=self.top_p)


def normalised_texts(texts: list[str]) -> list[str]:
    """Each text normalised (:func:`mvjax.text.tokenizer.normalize_text`); a SynthesisError names the bad one."""
    out = []
    for i, text in enumerate(texts):
        where = f"text {i + 1}" if len(texts) > 1 else "text"
        try:
            normalised = normalize_text(text)
        except TextError as exc:
            raise SynthesisError(f"{where}: {exc}" if len(texts) > 1 else str(exc)) from None
        if not normalised:
            raise SynthesisError(f"{where} is empty")
        out.append(normalised)
    return out
