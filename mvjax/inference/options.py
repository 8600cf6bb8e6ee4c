"""The options of a synthesis, each default and each check written once.

:class:`SamplingConfig` is the first stage's sampling (guidance scale, temperature, top-k, top-p):
its defaults and bounds are the ones the library checks, the CLI's flags and the server's request
models read (:meth:`SamplingConfig.spec`). :class:`SynthesisOptions` embeds it with the second
stage's sampling, chunking, batching and the decoder; the scheduler, the CLI and the server all
pass one of these.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar, NamedTuple, Optional, Union

from mvjax.core.errors import MvjaxError
from mvjax.inference.second_stage import DEFAULT_STAGE2_TEMPERATURE, DEFAULT_STAGE2_TOP_K
from mvjax.text.tokenizer import TextError, normalize_text

DEFAULT_BATCH_SIZE = 8
DEFAULT_STEPS = 8  # first-stage tokens per continuous-batching engine call
DEFAULT_PAGE_SIZE = 16  # KV-cache positions per page when the engine's cache is paged
BATCHING = ("engine", "static")
DECODERS = ("mbd", "encodec")
MAX_SEED = 2**32 - 1


class SynthesisError(MvjaxError, ValueError):
    """Input the pipeline cannot synthesise (text, speaker, options). ``option``: the
    :class:`SynthesisOptions` field at fault, when one is (its message then starts with the name)."""

    def __init__(self, message: str, option: Optional[str] = None):
        super().__init__(message)
        self.option = option


class Spec(NamedTuple):
    """A sampling value's default, range and meaning. ``low_open``: the low end is excluded."""

    default: Optional[float]
    low: float
    high: float
    help: str
    low_open: bool = False


def _check_number(name: str, value, spec: Spec) -> None:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (value > spec.low if spec.low_open else value >= spec.low) and value <= spec.high
    if not ok:
        bound = "(" if spec.low_open else "["
        raise SynthesisError(f"{name} must be a finite number in {bound}{spec.low:g}, {spec.high:g}], not {value!r}",
                             name)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the first stage samples each token; out-of-range values raise :class:`SynthesisError`.
    ``top_k``/``top_p`` None: that filter is off."""

    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = 0.95

    SPECS: ClassVar[dict[str, Spec]] = {
        "guidance_scale": Spec(3.0, 0.0, 10.0, "classifier-free speaker guidance (1 = conditioned logits only)"),
        "temperature": Spec(1.0, 0.0, 5.0, "first-stage temperature; 0 = greedy"),
        "top_p": Spec(0.95, 0.0, 1.0, "first-stage nucleus sampling", low_open=True),
    }

    def __post_init__(self):
        for name in ("guidance_scale", "temperature"):
            _check_number(name, getattr(self, name), self.SPECS[name])
        if self.top_p is not None:
            _check_number("top_p", self.top_p, self.SPECS["top_p"])
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise SynthesisError(f"top_k must be a positive integer or None, not {self.top_k!r}", "top_k")

    @classmethod
    def spec(cls, name: str) -> Spec:
        """``name``'s default, bounds and meaning (for argparse flags and request models)."""
        return cls.SPECS[name]

    FIELDS: ClassVar[tuple[str, ...]] = ("guidance_scale", "temperature", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """Streaming within a chunk (continuous-batching first stage): every ``frames`` new codec frames
    (``first_frames`` for a chunk's first piece; default ``frames``) the audio of the frames at least
    ``lookahead`` behind the newest is sent, its codebooks 3-8 from a second-stage pass over the
    frames so far. ``lookahead=None``: a chunk's audio is sent only when the chunk is done (exactly
    the codes of a whole answer). A frame is 1/75 s at the released codec."""

    # Defaults from benchmarks/RESULTS.md "stream lookahead": on random-weight models the lookahead
    # hardly changes how many early codes equal the whole answer's, so the short one (earlier audio).
    frames: int = 16
    first_frames: Optional[int] = 8
    lookahead: Optional[int] = 4

    def __post_init__(self):
        for name in ("frames", "first_frames", "lookahead"):
            value = getattr(self, name)
            low = 0 if name == "lookahead" else 1
            if value is None and name != "frames":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 4096:
                raise SynthesisError(f"{name} must be an integer in [{low}, 4096], not {value!r}", name)

    def due(self, emitted: int) -> int:
        """Frames a chunk that has sent ``emitted`` frames needs ready before its next piece."""
        return self.frames if emitted or self.first_frames is None else self.first_frames


@dataclasses.dataclass(frozen=True)
class SynthesisOptions:
    """Everything :meth:`mvjax.TTS.synthesize` takes besides texts and speakers; invalid values raise
    :class:`SynthesisError` on construction. :meth:`build` also takes the sampling fields flat."""

    seed: int = 0
    sampling: SamplingConfig = SamplingConfig()  # the first stage's
    stage2_temperature: float = DEFAULT_STAGE2_TEMPERATURE
    stage2_top_k: Optional[int] = DEFAULT_STAGE2_TOP_K  # None or 0: off
    max_new_tokens: Optional[int] = None  # first-stage tokens per chunk
    long_form: bool = True
    batch_size: Union[int, dict, str] = DEFAULT_BATCH_SIZE
    # First-stage scheduling: "engine" (continuous batching, batch_size slots per device, engine_steps
    # tokens per call; one engine per device over a mesh) or "static" (batches of batch_size per device
    # decoded to their longest row).
    batching: str = "engine"
    engine_steps: int = DEFAULT_STEPS
    # The engine's KV cache in pages (mvjax.inference.engine, "Pages"): a pool of kv_pages pages of
    # kv_page_size positions per device shared by the slots, so memory follows the tokens held and more
    # slots fit; None: a whole block per slot (faster on CPU, where a paged step gathers its window).
    kv_pages: Optional[int] = None
    kv_page_size: int = DEFAULT_PAGE_SIZE
    decoder: str = "mbd"  # "mbd": multi-band diffusion; "encodec": the plain codec
    enhance: bool = True  # DeepFilterNet3 (48 kHz output)
    normalize: bool = True  # -14 LUFS
    progress: bool = False

    def __post_init__(self):
        if not isinstance(self.sampling, SamplingConfig):
            raise SynthesisError(f"sampling must be a SamplingConfig, not {type(self.sampling).__name__}", "sampling")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed <= MAX_SEED:
            raise SynthesisError(f"seed must be an integer in [0, {MAX_SEED}], not {self.seed!r}", "seed")
        _check_number("stage2_temperature", self.stage2_temperature, SamplingConfig.spec("temperature"))
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 2):
            raise SynthesisError(f"max_new_tokens must be >= 2 (two tokens per audio frame), not {self.max_new_tokens!r}",
                                 "max_new_tokens")
        check_choice("batching", self.batching, BATCHING)
        check_choice("decoder", self.decoder, DECODERS)
        if isinstance(self.engine_steps, bool) or not isinstance(self.engine_steps, int) or not 1 <= self.engine_steps <= 1024:
            raise SynthesisError(f"engine_steps must be an integer in [1, 1024], not {self.engine_steps!r}", "engine_steps")
        for name in ("kv_pages", "kv_page_size"):
            value = getattr(self, name)
            if value is None and name == "kv_pages":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= 1 << 20:
                raise SynthesisError(f"{name} must be an integer in [1, {1 << 20}], not {value!r}", name)
        if self.stage2_top_k is not None and self.stage2_top_k < 0:
            raise SynthesisError(f"stage2_top_k must be >= 0 (0 = off), not {self.stage2_top_k!r}", "stage2_top_k")

    @property
    def paging(self) -> Optional[tuple[int, int]]:
        """``(page_size, pages)`` for the engine's paged KV cache, or None (whole blocks)."""
        return None if self.kv_pages is None else (int(self.kv_page_size), int(self.kv_pages))

    @classmethod
    def build(cls, **fields) -> "SynthesisOptions":
        """Options from keyword fields, the first stage's sampling ones (``guidance_scale``,
        ``temperature``, ``top_k``, ``top_p``) given flat or as ``sampling``."""
        flat = {name: fields.pop(name) for name in SamplingConfig.FIELDS if name in fields}
        if flat:
            fields["sampling"] = dataclasses.replace(fields.get("sampling", SamplingConfig()), **flat)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SynthesisError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return cls(**fields)


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """A SynthesisError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise SynthesisError(f"{name} must be one of {', '.join(choices)}, not {value!r}", name)


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
