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
from convert_weights.safe_pickle import plain_config
from mvjax.nn.diffusion_unet import UnetConfig, abstract_params

PROCESSOR_KEYS = ("counts", "sum_x", "sum_x2", "sum_target_x2")


def unet_rules(cfg: UnetConfig) -> list[Rule]:
    """One rule per parameter: the torch key (dotted) -> the same path in our tree."""
    return [Rule(re.escape(path.replace("/", ".")), path) for path in flatten_tree(abstract_params(cfg))]


def _resolve(value, root):
    """Resolve plain ``${a.b}`` omegaconf interpolations against the band's config root."""
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        node = root
        for part in value[2:-1].split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConversionError(f"cannot resolve config interpolation {value!r}")
            node = node[part]
        return _resolve(node, root)
    if isinstance(value, Mapping):
        return {k: _resolve(v, root) for k, v in value.items()}
    return value


def convert_mbd_checkpoint(ckpt: Mapping[str, Any], source: str = "checkpoint") -> tuple[dict, dict]:
    """-> (config: {sample_rate, n_bands, bands: [{unet, schedule, processor}]}, params: {band_i: ..., processor_i: ...})."""
    if not isinstance(ckpt, Mapping) or "n_bands" not in ckpt:
        raise ConversionError(f"{source}: no 'n_bands' entry; not a multi-band diffusion checkpoint")
    n_bands = int(ckpt["n_bands"])
    config = {"sample_rate": int(ckpt.get("sample_rate", 24000)), "n_bands": n_bands, "bands": []}
    params: dict = {}
    for band in range(n_bands):
        entry = ckpt.get(band)
        if not isinstance(entry, Mapping) or not {"cfg", "model_state"} <= set(entry):
            raise ConversionError(f"{source}: band {band} lacks 'cfg' or 'model_state'")
        cfg = plain_config(entry["cfg"])
        cfg = {k: _resolve(cfg[k], cfg) for k in ("channels", "diffusion_unet", "schedule", "processor") if k in cfg}
        try:
            unet = UnetConfig.from_cfg(cfg)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{source}: band {band}: {exc}") from None
        state = strip_prefix(entry["model_state"])
        params[f"band_{band}"] = apply_rules(state, unet_rules(unet), abstract_params(unet))
        processor = dict(cfg.get("processor") or {"use": False})
        pstate = entry.get("processor_state") or {}
        if processor.get("use"):
            missing = [k for k in PROCESSOR_KEYS if k not in pstate]
            if missing:
                raise ConversionError(f"{source}: band {band} processor_state lacks {', '.join(missing)}")
            params[f"processor_{band}"] = {k: np.asarray(pstate[k], np.float32) for k in PROCESSOR_KEYS}
        config["bands"].append({"unet": dataclasses.asdict(unet), "schedule": dict(cfg["schedule"]), "processor": processor})
    return config, params
