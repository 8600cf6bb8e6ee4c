"""The ``encodec`` package's 24 kHz codec (``encodec_24khz-d7cc33bc.th``, a plain state dict) -> our tree.

Weight norm is folded at conversion: ``weight = g * v / ||v||`` with the norm over every
dimension but 0 of the stored ``v`` (for a transposed convolution dim 0 is the input
channel). The quantizer's training buffers (``embed_avg``, ``cluster_size``, ``inited``) are
not needed to code or decode and are dropped; anything else unexpected is an error.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from convert_weights.mapping import (
    ConversionError,
    Rule,
    apply_rules,
    linear_weight,
    strip_prefix,
)
from mvjax.nn.encodec import EncodecConfig, abstract_params

_CONV = r"(?:conv\.conv|convtr\.convtr)"


def fold_weight_norm(state: Mapping[str, Any]) -> dict[str, Any]:
    """Replace every ``*.weight_g`` / ``*.weight_v`` pair (or the parametrization spelling) by ``*.weight``."""
    out = dict(state)
    spellings = [(".weight_g", ".weight_v"), (".parametrizations.weight.original0", ".parametrizations.weight.original1")]
    for g_suffix, v_suffix in spellings:
        for key in [k for k in state if k.endswith(v_suffix)]:
            g_key = key[: -len(v_suffix)] + g_suffix
            if g_key not in state:
                raise ConversionError(f"missing checkpoint key {g_key!r} (weight norm: {key!r} is present)")
        for key in [k for k in state if k.endswith(g_suffix)]:
            base = key[: -len(g_suffix)]
            v_key = base + v_suffix
            if v_key not in state:
                raise ConversionError(f"missing checkpoint key {v_key!r} (weight norm: {key!r} is present)")
            g = np.asarray(state[key], np.float64)
            v = np.asarray(state[v_key], np.float64)
            norm = np.sqrt(np.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
            out[base + ".weight"] = (g * v / norm).astype(np.float32)
            del out[key], out[v_key]
    return out


def encodec_rules() -> list[Rule]:
    part = r"(?P<part>encoder|decoder)\.model\.(?P<i>\d+)"
    rules = [
        Rule(part + rf"\.{_CONV}\.(?P<p>weight|bias)", "{part}/{i}/{p}"),
        Rule(part + rf"\.block\.(?P<j>\d+)\.{_CONV}\.(?P<p>weight|bias)", "{part}/{i}/block/{j}/{p}"),
        Rule(part + rf"\.shortcut\.{_CONV}\.(?P<p>weight|bias)", "{part}/{i}/shortcut/{p}"),
        Rule(part + r"\.lstm\.weight_ih_l(?P<k>\d+)", "{part}/{i}/lstm_{k}/w_ih", linear_weight),
        Rule(part + r"\.lstm\.weight_hh_l(?P<k>\d+)", "{part}/{i}/lstm_{k}/w_hh", linear_weight),
        Rule(part + r"\.lstm\.bias_ih_l(?P<k>\d+)", "{part}/{i}/lstm_{k}/b_ih"),
        Rule(part + r"\.lstm\.bias_hh_l(?P<k>\d+)", "{part}/{i}/lstm_{k}/b_hh"),
        Rule(r"quantizer\.vq\.layers\.(?P<q>\d+)\._codebook\.embed", "quantizer/codebooks", stack_group="q"),
        Rule(r"quantizer\.vq\.layers\.(?P<q>\d+)\._codebook\.(?:embed_avg|cluster_size|inited)", None),
    ]
    return rules


def config_from_state(state: Mapping[str, Any]) -> EncodecConfig:
    """Sizes from the weights; the structural options are those of the released 24 kHz model."""
    try:
        first = state["encoder.model.0.conv.conv.weight"]
        books = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"quantizer\.vq\.layers\.(\d+)\._codebook\.embed", k)))
        embed = state["quantizer.vq.layers.0._codebook.embed"]
    except KeyError as exc:
        raise ConversionError(f"missing checkpoint key {exc.args[0]!r}: not an EnCodec state dict") from None
    # The decoder's transposed convolutions, in order, have kernel = 2 * ratio.
    keys = [k for k in state if re.fullmatch(r"decoder\.model\.\d+\.convtr\.convtr\.weight", k)]
    ratios = [int(state[k].shape[-1]) // 2 for k in sorted(keys, key=lambda k: int(k.split(".")[2]))]
    lstm = len([k for k in state if re.fullmatch(r"encoder\.model\.\d+\.lstm\.weight_ih_l\d+", k)])
    return EncodecConfig(
        channels=int(first.shape[1]),
        n_filters=int(first.shape[0]),
        dimension=int(embed.shape[1]),
        ratios=tuple(ratios),
        lstm_layers=lstm,
        n_q=len(books),
        bins=int(embed.shape[0]),
    )


def convert_encodec_state(state: Mapping[str, Any], source: str = "checkpoint") -> tuple[EncodecConfig, dict]:
    if not isinstance(state, Mapping):
        raise ConversionError(f"{source}: expected a state dict")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    state = fold_weight_norm(strip_prefix(state))
    cfg = config_from_state(state)
    return cfg, apply_rules(state, encodec_rules(), abstract_params(cfg))
