"""``first_stage.pt`` / ``second_stage.pt`` -> our GPT parameter tree, config and tokenizer."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from convert_weights.mapping import (
    ConversionError,
    Rule,
    apply_rules,
    identity,
    linear_weight,
    strip_prefix,
)
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt import abstract_params
from mvjax.text.tokenizer import TokenizerSpec

_LAYER = r"transformer\.h\.(?P<layer>\d+)\."


def gpt_rules(config: GPTConfig) -> list[Rule]:
    """The key-mapping table for the reference ``GPT`` state dict."""
    def layer(src: str, dst: str, hook=identity) -> Rule:
        return Rule(_LAYER + src, "blocks/" + dst, hook, stack_group="layer")

    rules = [
        Rule(r"transformer\.wtes\.(?P<i>\d+)\.weight", "wte_{i}/embedding"),
        Rule(r"transformer\.wpe\.weight", "wpe/embedding"),
        Rule(r"speaker_cond_pos\.weight", "speaker_proj/kernel", linear_weight),
        Rule(r"transformer\.ln_f\.weight", "ln_f/scale"),
        Rule(r"transformer\.ln_f\.bias", "ln_f/bias"),
    ]
    for norm in ("ln_1", "ln_2"):
        rules += [layer(rf"{norm}\.weight", f"{norm}/scale"), layer(rf"{norm}\.bias", f"{norm}/bias")]
    for proj in ("c_attn", "c_proj"):
        rules += [
            layer(rf"attn\.{proj}\.weight", f"attn/{proj}/kernel", linear_weight),
            layer(rf"attn\.{proj}\.bias", f"attn/{proj}/bias"),
        ]
    mlp = ("swiglu\\.w1", "swiglu\\.w3", "c_proj") if config.nonlinearity_type == "swiglu" else ("c_fc", "c_proj")
    for src in mlp:
        dst = src.split(".")[-1]
        rules += [
            layer(rf"mlp\.{src}\.weight", f"mlp/{dst}/kernel", linear_weight),
            layer(rf"mlp\.{src}\.bias", f"mlp/{dst}/bias"),
        ]
    if config.tied_heads:
        # Tied heads are the embedding tables themselves; the duplicate entry is checked, then dropped.
        rules.append(Rule(r"lm_heads\.(?P<i>\d+)\.weight", None))
    else:
        rules.append(Rule(r"lm_heads\.(?P<i>\d+)\.weight", "lm_head_{i}/kernel", linear_weight))
    return rules


def _check_tied(state: Mapping[str, np.ndarray], config: GPTConfig) -> None:
    for i in range(len(config.vocab_sizes)):
        head, table = f"lm_heads.{i}.weight", f"transformer.wtes.{i}.weight"
        if head in state and table in state and not np.array_equal(
            np.asarray(state[head], np.float32), np.asarray(state[table], np.float32)
        ):
            raise ConversionError(f"checkpoint key {head!r} should be tied to {table!r} but holds different values")
    extra = [k for k in state if k.startswith("lm_heads.") and int(k.split(".")[1]) >= len(config.vocab_sizes)]
    if extra:
        raise ConversionError(f"unused checkpoint key {extra[0]!r}: the model has {len(config.vocab_sizes)} tied heads")


def convert_gpt_checkpoint(ckpt: Mapping[str, Any], source: str = "checkpoint") -> tuple[GPTConfig, dict, TokenizerSpec]:
    """Turn a loaded released checkpoint dict into (config, params, tokenizer spec)."""
    for field in ("model", "model_args"):
        if field not in ckpt:
            raise ConversionError(f"{source}: no {field!r} entry; not a MetaVoice GPT checkpoint")
    meta = ckpt.get("meta") or {}
    model_args = dict(ckpt["model_args"])
    train_cfg = ckpt.get("config") or {}
    if "causal" in train_cfg and bool(train_cfg["causal"]) != bool(model_args.get("causal", True)):
        raise ConversionError(f"{source}: config.causal and model_args.causal disagree")
    config = GPTConfig.from_checkpoint(model_args, meta)
    if "tokenizer" not in meta:
        raise ConversionError(f"{source}: meta has no 'tokenizer' entry")
    tokenizer = TokenizerSpec.from_meta(meta["tokenizer"])

    state = strip_prefix(ckpt["model"])
    if config.tied_heads:
        _check_tied(state, config)
    params = apply_rules(state, gpt_rules(config), abstract_params(config))
    return config, params, tokenizer
