"""Frozen model configurations, built from a checkpoint's own metadata.

Nothing here hard-codes the released sizes: every field comes from the
checkpoint's ``model_args`` / ``config`` / ``meta`` (or the JSON we write at
conversion time), so fixtures of any size load the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from mvjax.core.errors import MvjaxError

NORM_TYPES = ("rmsnorm", "layernorm")
NONLINEARITIES = ("swiglu", "gelu")


class ConfigError(MvjaxError, ValueError):
    """A model configuration that the implementation cannot honour."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """One GPT stage (the causal first stage or the non-causal second stage)."""

    block_size: int
    vocab_sizes: tuple[int, ...]  # one input embedding table per token hierarchy
    target_vocab_sizes: tuple[int, ...] | None  # output heads; None = tied to the inputs
    n_layer: int
    n_head: int
    n_embd: int
    bias: bool = False
    causal: bool = True
    spk_emb_on_text: bool = True
    norm_type: str = "layernorm"
    rmsnorm_eps: float | None = None
    nonlinearity_type: str = "gelu"
    swiglu_multiple_of: int | None = None
    speaker_emb_dim: int | None = None  # None: the stage takes no speaker embedding

    def __post_init__(self):
        if self.norm_type not in NORM_TYPES:
            raise ConfigError(f"unknown norm_type {self.norm_type!r}; expected one of {NORM_TYPES}")
        if self.nonlinearity_type not in NONLINEARITIES:
            raise ConfigError(
                f"unknown nonlinearity_type {self.nonlinearity_type!r}; expected one of {NONLINEARITIES}"
            )
        if self.norm_type == "rmsnorm" and self.rmsnorm_eps is None:
            raise ConfigError("norm_type 'rmsnorm' needs rmsnorm_eps")
        if self.nonlinearity_type == "swiglu" and not self.swiglu_multiple_of:
            raise ConfigError("nonlinearity_type 'swiglu' needs swiglu_multiple_of")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.target_vocab_sizes is None and not self.causal:
            raise ConfigError("a non-causal GPT needs target_vocab_sizes (its heads are not tied)")
        if self.target_vocab_sizes is not None and self.causal:
            raise ConfigError("a causal GPT ties its heads to its embeddings: target_vocab_sizes must be None")
        if not self.causal and not self.spk_emb_on_text:
            raise ConfigError("spk_emb_on_text=False is not defined for a non-causal GPT")

    # Derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def tied_heads(self) -> bool:
        """The reference ties ``lm_heads[i]`` to ``wtes[i]`` when no target sizes are given."""
        return self.target_vocab_sizes is None

    @property
    def output_vocab_sizes(self) -> tuple[int, ...]:
        return self.vocab_sizes if self.target_vocab_sizes is None else self.target_vocab_sizes

    @property
    def mlp_hidden(self) -> int:
        hidden = 4 * self.n_embd
        if self.nonlinearity_type == "swiglu":
            hidden = int(2 * hidden / 3)
            hidden = self.swiglu_multiple_of * math.ceil(hidden / self.swiglu_multiple_of)
        return hidden

    @property
    def norm_eps(self) -> float:
        # torch LayerNorm in the reference uses a fixed 1e-5.
        return float(self.rmsnorm_eps) if self.norm_type == "rmsnorm" else 1e-5

    # (De)serialisation --------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, model_args: Mapping[str, Any], meta: Mapping[str, Any] | None) -> "GPTConfig":
        """Build from a released checkpoint's ``model_args`` and ``meta``."""
        meta = meta or {}
        speaker_emb_dim = int(meta["speaker_emb_size"]) if meta.get("speaker_cond") else None

        def get(name, default=None):
            return model_args.get(name, default)

        required = ("block_size", "vocab_sizes", "n_layer", "n_head", "n_embd")
        missing = [k for k in required if k not in model_args]
        if missing:
            raise ConfigError(f"model_args lacks {', '.join(missing)}")
        target = get("target_vocab_sizes")
        return cls(
            block_size=int(get("block_size")),
            vocab_sizes=tuple(int(v) for v in get("vocab_sizes")),
            target_vocab_sizes=None if target is None else tuple(int(v) for v in target),
            n_layer=int(get("n_layer")),
            n_head=int(get("n_head")),
            n_embd=int(get("n_embd")),
            bias=bool(get("bias", True)),
            causal=bool(get("causal", True)),
            spk_emb_on_text=bool(get("spk_emb_on_text", True)),
            norm_type=str(get("norm_type", "layernorm")),
            rmsnorm_eps=None if get("rmsnorm_eps") is None else float(get("rmsnorm_eps")),
            nonlinearity_type=str(get("nonlinearity_type", "gelu")),
            swiglu_multiple_of=None if get("swiglu_multiple_of") is None else int(get("swiglu_multiple_of")),
            speaker_emb_dim=speaker_emb_dim,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vocab_sizes"] = list(self.vocab_sizes)
        d["target_vocab_sizes"] = None if self.target_vocab_sizes is None else list(self.target_vocab_sizes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown GPT config fields: {sorted(unknown)}")
        d = dict(d)
        d["vocab_sizes"] = tuple(d["vocab_sizes"])
        if d.get("target_vocab_sizes") is not None:
            d["target_vocab_sizes"] = tuple(d["target_vocab_sizes"])
        return cls(**d)
