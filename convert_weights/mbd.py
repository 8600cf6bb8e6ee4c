"""``mbd_comp_8.pt`` (audiocraft multi-band diffusion, one U-Net per band) -> our trees and config.

The per-band omegaconf ``cfg`` objects load through stand-ins (see safe_pickle) and become
plain JSON; the U-Net weights keep their PyTorch names and layouts, checked key by key
against the shapes the band's own config implies.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from convert_weights.mapping import (
    ConversionError,
    Rule,
    apply_rules,
    flatten_tree,
    strip_prefix,
)
from convert_weights.safe_pickle import CheckpointError, plain_config
from mvjax.nn.diffusion_unet import UnetConfig, abstract_params

PROCESSOR_KEYS = ("counts", "sum_x", "sum_x2", "sum_target_x2")


def unet_rules(cfg: UnetConfig) -> list[Rule]:
    """One rule per parameter: the torch key (dotted) -> the same path in our tree."""
    return [Rule(re.escape(path.replace("/", ".")), path) for path in flatten_tree(abstract_params(cfg))]


# Interpolation chains longer than this, or resolutions that expand a band's config past
# MAX_RESOLVE_STEPS values (shared references expanded), are refused as malformed.
MAX_INTERPOLATION_CHAIN = 64
MAX_RESOLVE_STEPS = 100_000
# Structural loop counts of the U-Net; the released model has depth 4 and one res block.
MAX_UNET_DEPTH = 64
MAX_RES_BLOCKS = 64


def _resolve(value, root, _budget=None, _chain=()):
    """Resolve plain ``${a.b}`` omegaconf interpolations against the band's config root.

    A self-referencing chain (``a: ${b}``, ``b: ${a}``) or one longer than
    MAX_INTERPOLATION_CHAIN links, and a config that expands past MAX_RESOLVE_STEPS values,
    are ConversionErrors rather than a RecursionError or a hang."""
    budget = [0] if _budget is None else _budget
    budget[0] += 1
    if budget[0] > MAX_RESOLVE_STEPS:
        raise ConversionError(f"config interpolations expand to more than {MAX_RESOLVE_STEPS} values")
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        if value in _chain:
            raise ConversionError(f"config interpolation {value!r} refers to itself (through {' -> '.join(_chain)})")
        if len(_chain) >= MAX_INTERPOLATION_CHAIN:
            raise ConversionError(f"config interpolation chain longer than {MAX_INTERPOLATION_CHAIN} links at {value!r}")
        node = root
        for part in value[2:-1].split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConversionError(f"cannot resolve config interpolation {value!r}")
            node = node[part]
        return _resolve(node, root, budget, _chain + (value,))
    if isinstance(value, Mapping):
        return {k: _resolve(v, root, budget, _chain) for k, v in value.items()}
    return value


def _check_int(value, name: str, low: int, high: int | None = None) -> None:
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConversionError(f"{name} must be an integer {bound}, got {value!r:.80}")


def _check_unet(unet: UnetConfig) -> None:
    """Types and ranges of the U-Net options (a config is data from the file, not trusted)."""
    _check_int(unet.depth, "diffusion_unet.depth", 1, MAX_UNET_DEPTH)
    _check_int(unet.res_blocks, "diffusion_unet.res_blocks", 0, MAX_RES_BLOCKS)
    for name in ("chin", "hidden", "max_channels", "num_steps", "kernel", "stride", "norm_groups"):
        _check_int(getattr(unet, name), f"diffusion_unet.{name}" if name != "num_steps" else "schedule.num_steps", 1)
    if unet.codec_dim is not None:
        _check_int(unet.codec_dim, "diffusion_unet.codec_dim", 1)
    if type(unet.growth) not in (int, float) or not 0 < unet.growth < float("inf"):
        raise ConversionError(f"diffusion_unet.growth must be a positive number, got {unet.growth!r:.80}")
    for name in ("emb_all_layers", "cross_attention", "bilstm", "transformer"):
        if type(getattr(unet, name)) is not bool:
            raise ConversionError(f"diffusion_unet.{name} must be true or false, got {getattr(unet, name)!r:.80}")


def convert_mbd_checkpoint(ckpt: Mapping[str, Any], source: str = "checkpoint") -> tuple[dict, dict]:
    """-> (config: {sample_rate, n_bands, bands: [{unet, schedule, processor}]}, params: {band_i: ..., processor_i: ...})."""
    if not isinstance(ckpt, Mapping) or "n_bands" not in ckpt:
        raise ConversionError(f"{source}: no 'n_bands' entry; not a multi-band diffusion checkpoint")
    n_bands = ckpt["n_bands"]
    bands_present = sum(1 for k in ckpt if type(k) is int)
    if type(n_bands) is not int or not 1 <= n_bands <= max(bands_present, 1):
        raise ConversionError(
            f"{source}: n_bands is {n_bands!r:.80}; expected an integer from 1 to the {bands_present} bands the file holds"
        )
    sample_rate = ckpt.get("sample_rate", 24000)
    if type(sample_rate) is not int or sample_rate <= 0:
        raise ConversionError(f"{source}: sample_rate is {sample_rate!r:.80}; expected a positive integer")
    config = {"sample_rate": sample_rate, "n_bands": n_bands, "bands": []}
    params: dict = {}
    for band in range(n_bands):
        entry = ckpt.get(band)
        if not isinstance(entry, Mapping) or not {"cfg", "model_state"} <= set(entry):
            raise ConversionError(f"{source}: band {band} lacks 'cfg' or 'model_state'")
        try:
            cfg = plain_config(entry["cfg"])
        except CheckpointError as exc:
            raise ConversionError(f"{source}: band {band}: {exc}") from None
        if not isinstance(cfg, Mapping):
            raise ConversionError(f"{source}: band {band}: cfg is {type(cfg).__name__}, not a mapping")
        try:
            cfg = {k: _resolve(cfg[k], cfg) for k in ("channels", "diffusion_unet", "schedule", "processor") if k in cfg}
        except ConversionError as exc:
            raise ConversionError(f"{source}: band {band}: {exc}") from None
        for key in ("diffusion_unet", "schedule"):
            if not isinstance(cfg.get(key), Mapping):
                raise ConversionError(f"{source}: band {band}: cfg.{key} is missing or not a mapping")
        try:
            unet = UnetConfig.from_cfg(cfg)
            _check_unet(unet)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{source}: band {band}: {exc}") from None
        if not isinstance(entry["model_state"], Mapping):
            raise ConversionError(f"{source}: band {band}: model_state is not a state dict")
        state = strip_prefix(entry["model_state"])
        params[f"band_{band}"] = apply_rules(state, unet_rules(unet), abstract_params(unet))
        processor = cfg.get("processor") or {"use": False}
        if not isinstance(processor, Mapping):
            raise ConversionError(f"{source}: band {band}: cfg.processor is not a mapping")
        processor = dict(processor)
        pstate = entry.get("processor_state") or {}
        if not isinstance(pstate, Mapping):
            raise ConversionError(f"{source}: band {band}: processor_state is not a mapping")
        if processor.get("use"):
            missing = [k for k in PROCESSOR_KEYS if k not in pstate]
            if missing:
                raise ConversionError(f"{source}: band {band} processor_state lacks {', '.join(missing)}")
            bad = [k for k in PROCESSOR_KEYS if not isinstance(pstate[k], np.ndarray)]
            if bad:
                raise ConversionError(f"{source}: band {band} processor_state {bad[0]!r} is not a tensor")
            params[f"processor_{band}"] = {k: np.asarray(pstate[k], np.float32) for k in PROCESSOR_KEYS}
        config["bands"].append({"unet": dataclasses.asdict(unet), "schedule": dict(cfg["schedule"]), "processor": processor})
    return config, params
