"""Our first-stage (or second-stage) parameter tree -> a checkpoint in the released PyTorch layout.

The inverse of :mod:`convert_weights.gpt`: every state-dict name the released ``GPT`` module
has is produced from the converted tree through the same rule table (:func:`gpt_rules`) that
conversion reads, so the two directions cannot drift apart. Linear kernels go back to torch's
(out, in) layout, stacked layers are split again, tied heads are the embedding table itself
(one shared storage in the file, as ``torch.save`` writes a tied module), and biases appear
only where the config has them.

:func:`write_released_gpt` writes the whole checkpoint dict the reference code reads
(``model``, ``model_args`` with every field of its ``GPTConfig``, ``iter_num``,
``best_val_loss``, ``config`` with ``causal``, ``meta`` with the tokenizer and the speaker
conditioning) through the torch-free writer, atomically. A ``first_stage.pt`` written this way
loads into the reference (``GPTConfig(**model_args)``, ``load_state_dict``) and converts back
into exactly the tree it came from. Quantised trees (the int8/bf16 decode layout) are refused:
only float weights have a released form.
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from convert_weights.gpt import gpt_rules
from convert_weights.mapping import flatten_tree, identity, linear_weight
from convert_weights.torch_writer import save_checkpoint
from mvjax.core.errors import MvjaxError
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt import abstract_params
from mvjax.text.tokenizer import TokenizerSpec

# Fields of the reference GPTConfig that ours does not keep (inference-irrelevant), at the values
# the released checkpoints hold.
_REFERENCE_ONLY_ARGS = {"dropout": 0.0, "spkemb_dropout": 0.0, "attn_kernel_type": "torch_attn", "kv_cache_enabled": False}


class ExportError(MvjaxError, ValueError):
    """Parameters or settings that have no released-layout checkpoint."""


def float_params(config: GPTConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``params`` flattened ('a/b/c' paths) as float32 numpy arrays, checked leaf by leaf against the
    converted layout of ``config``; a quantised or otherwise different tree is one :class:`ExportError`."""
    flat = flatten_tree(params)
    expected = flatten_tree(abstract_params(config))
    for path, leaf in flat.items():
        dtype = getattr(leaf, "dtype", None)
        if path.endswith("/q") or (dtype is not None and not jnp.issubdtype(dtype, jnp.floating)):
            raise ExportError(f"the parameters are quantised ({path!r} is {dtype}); only float weights can be "
                              "exported: export the float model, then quantise the result")
    extra = sorted(set(flat) - set(expected))
    missing = sorted(set(expected) - set(flat))
    if extra or missing:
        what = f"has an unexpected leaf {extra[0]!r}" if extra else f"lacks {missing[0]!r}"
        raise ExportError(f"the parameter tree {what}: not the converted layout of this config "
                          "(a quantised or decode-layout tree cannot be exported)")
    out = {}
    for path, want in expected.items():
        arr = np.asarray(flat[path])
        if tuple(arr.shape) != tuple(want.shape):
            raise ExportError(f"parameter {path!r} has shape {tuple(arr.shape)}, the config expects {tuple(want.shape)}")
        out[path] = np.ascontiguousarray(arr.astype(np.float32, copy=False))
    return out


def _released_names(config: GPTConfig) -> list[str]:
    """Every candidate state-dict name, in the order the reference module registers its parameters."""
    names = [f"transformer.wtes.{i}.weight" for i in range(len(config.vocab_sizes))]
    names.append("transformer.wpe.weight")
    mlp_in = ("swiglu.w1", "swiglu.w3") if config.nonlinearity_type == "swiglu" else ("c_fc",)
    for layer in range(config.n_layer):
        h = f"transformer.h.{layer}."
        modules = ["ln_1", "ln_2", "attn.c_attn", "attn.c_proj"] + [f"mlp.{m}" for m in mlp_in] + ["mlp.c_proj"]
        for module in modules:
            names += [h + module + ".weight", h + module + ".bias"]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias", "speaker_cond_pos.weight"]
    names += [f"lm_heads.{i}.weight" for i in range(len(config.output_vocab_sizes))]
    return names


def released_gpt_state(config: GPTConfig, params: Mapping[str, Any], prefix: str = "") -> "collections.OrderedDict[str, np.ndarray]":
    """The reference ``GPT.state_dict()`` (float32 numpy arrays) holding ``params``.

    Names come out in the module's registration order, each optionally behind ``prefix``
    (``"_orig_mod."`` is how the released first stage, saved from a compiled module, spells them).
    Tied heads are the very array of their embedding table."""
    flat = float_params(config, params)
    rules = [(re.compile(rule.source), rule) for rule in gpt_rules(config)]
    state: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    used: set[str] = set()
    for name in _released_names(config):
        rule, match = next(((r, m) for pattern, r in rules if (m := pattern.fullmatch(name))), (None, None))
        if rule is None:
            raise ExportError(f"no conversion rule for {name!r}")  # the candidate list and gpt_rules disagree: a bug
        if rule.target is None:  # a tied head: the table it is tied to
            table = f"transformer.wtes.{match.group('i')}.weight"
            state[prefix + name] = state[prefix + table]
            continue
        target = rule.target.format(**match.groupdict())
        if target not in flat:
            continue  # a bias or speaker projection this config does not have
        value = flat[target]
        if rule.stack_group is not None:
            value = value[int(match.group(rule.stack_group))]
        if rule.hook is linear_weight:
            value = value.T
        elif rule.hook is not identity:
            raise ExportError(f"no inverse for the conversion hook of {name!r}")  # a bug, not a user error
        state[prefix + name] = np.ascontiguousarray(value)
        used.add(target)
    unused = sorted(set(flat) - used)
    if unused:
        raise ExportError(f"parameter {unused[0]!r} has no released name")
    return state


def released_model_args(config: GPTConfig) -> dict:
    """``model_args`` as the reference's ``GPTConfig(**model_args)`` and its fine-tuning script read them."""
    return {
        "block_size": config.block_size,
        "vocab_sizes": list(config.vocab_sizes),
        "target_vocab_sizes": None if config.target_vocab_sizes is None else list(config.target_vocab_sizes),
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "dropout": _REFERENCE_ONLY_ARGS["dropout"],
        "spkemb_dropout": _REFERENCE_ONLY_ARGS["spkemb_dropout"],
        "bias": config.bias,
        "causal": config.causal,
        "spk_emb_on_text": config.spk_emb_on_text,
        "norm_type": config.norm_type,
        "rmsnorm_eps": config.rmsnorm_eps,
        "nonlinearity_type": config.nonlinearity_type,
        "swiglu_multiple_of": config.swiglu_multiple_of,
        "attn_kernel_type": _REFERENCE_ONLY_ARGS["attn_kernel_type"],
        "kv_cache_enabled": _REFERENCE_ONLY_ARGS["kv_cache_enabled"],
    }


def tokenizer_meta(spec: TokenizerSpec) -> dict:
    """``meta["tokenizer"]``: the keyword arguments of the reference's BPE tokenizer class."""
    spec = getattr(spec, "spec", spec)  # a Tokenizer carries its spec
    if not isinstance(spec, TokenizerSpec):
        raise ExportError(f"expected a TokenizerSpec, got {type(spec).__name__}")
    return {
        "name": spec.name,
        "pat_str": spec.pat_str,
        "mergeable_ranks": {bytes(k): int(v) for k, v in sorted(spec.mergeable_ranks.items(), key=lambda kv: kv[1])},
        "special_tokens": {str(k): int(v) for k, v in spec.special_tokens.items()},
        "offset": int(spec.offset),
    }


def released_gpt_checkpoint(config: GPTConfig, params: Mapping[str, Any], tokenizer_spec: TokenizerSpec,
                            extra_config: Mapping[str, Any] | None = None, *, iter_num: int = 0,
                            best_val_loss: float = float("inf"), prefix: str = "") -> dict:
    """The checkpoint dict :func:`write_released_gpt` saves."""
    extra = dict(extra_config or {})
    if "causal" in extra and bool(extra["causal"]) != config.causal:
        raise ExportError(f"extra_config says causal={extra['causal']!r} but the model is "
                          f"{'causal' if config.causal else 'non-causal'}")
    speaker = config.speaker_emb_dim is not None
    return {
        "model": released_gpt_state(config, params, prefix),
        "model_args": released_model_args(config),
        "iter_num": int(iter_num),
        "best_val_loss": float(best_val_loss),
        "config": {**extra, "causal": config.causal},
        "meta": {
            "tokenizer": tokenizer_meta(tokenizer_spec),
            "speaker_cond": speaker,
            "speaker_emb_size": config.speaker_emb_dim,
        },
    }


def write_released_gpt(path: str | os.PathLike, config: GPTConfig, params: Mapping[str, Any],
                       tokenizer_spec: TokenizerSpec, extra_config: Mapping[str, Any] | None = None, *,
                       iter_num: int = 0, best_val_loss: float = float("inf"), prefix: str = "") -> Path:
    """Write ``params`` as a released-layout GPT checkpoint (``first_stage.pt`` ...) at ``path``, atomically.

    ``extra_config``: entries added to the checkpoint's training ``config`` (scalars, for the
    record; ``causal`` is always the model's). ``iter_num`` / ``best_val_loss``: the values the
    reference's fine-tuning resumes from (0 and infinity: a fresh start)."""
    ckpt = released_gpt_checkpoint(config, params, tokenizer_spec, extra_config, iter_num=iter_num,
                                   best_val_loss=best_val_loss, prefix=prefix)
    return save_checkpoint(path, ckpt)
