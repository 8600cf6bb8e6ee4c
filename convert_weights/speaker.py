"""``speaker_encoder.pt`` -> speaker-encoder parameters and config (sizes read from the weights)."""

from __future__ import annotations

import re
from typing import Any, Mapping

from convert_weights.mapping import (
    ConversionError,
    Rule,
    apply_rules,
    linear_weight,
    strip_prefix,
)
from mvjax.nn.speaker_encoder import SpeakerEncoderConfig, abstract_params

# Trained for the GE2E loss only; not used to embed.
UNUSED_KEYS = ("similarity_weight", "similarity_bias")


def speaker_rules() -> list[Rule]:
    rules = [
        Rule(r"lstm\.weight_ih_l(?P<k>\d+)", "lstm_{k}/w_ih", linear_weight),
        Rule(r"lstm\.weight_hh_l(?P<k>\d+)", "lstm_{k}/w_hh", linear_weight),
        Rule(r"lstm\.bias_ih_l(?P<k>\d+)", "lstm_{k}/b_ih"),
        Rule(r"lstm\.bias_hh_l(?P<k>\d+)", "lstm_{k}/b_hh"),
        Rule(r"linear\.weight", "linear/kernel", linear_weight),
        Rule(r"linear\.bias", "linear/bias"),
    ]
    rules += [Rule(re.escape(k), None) for k in UNUSED_KEYS]
    return rules


def _config_from_state(state: Mapping[str, Any]) -> SpeakerEncoderConfig:
    layers = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"lstm\.weight_ih_l(\d+)", k)))
    if not layers or "linear.weight" not in state:
        raise ConversionError("missing checkpoint key 'lstm.weight_ih_l0' or 'linear.weight': not a speaker encoder")
    if layers != list(range(len(layers))):
        raise ConversionError(f"LSTM layers are not numbered 0..{len(layers) - 1}: found {layers}")
    w_ih0 = state["lstm.weight_ih_l0"]
    hidden = int(w_ih0.shape[0]) // 4
    return SpeakerEncoderConfig(
        num_layers=len(layers),
        input_size=int(w_ih0.shape[1]),
        hidden_size=hidden,
        embedding_size=int(state["linear.weight"].shape[0]),
    )


def convert_speaker_checkpoint(ckpt: Mapping[str, Any], source: str = "checkpoint") -> tuple[SpeakerEncoderConfig, dict]:
    if not isinstance(ckpt, Mapping) or "model_state" not in ckpt:
        raise ConversionError(f"{source}: no 'model_state' entry; not a speaker-encoder checkpoint")
    state = strip_prefix(ckpt["model_state"])
    cfg = _config_from_state(state)
    return cfg, apply_rules(state, speaker_rules(), abstract_params(cfg))
