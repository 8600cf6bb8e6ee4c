"""Export a fine-tuned first stage as a complete converted model directory.

``export_model(base, config, params, spec, OUT)`` writes ``OUT`` in the converted-model format
(:mod:`mvjax.io.checkpoint`), so ``python -m mvjax.synthesize --model OUT`` and
``mvjax.TTS.load(OUT)`` use it unchanged:

    OUT/manifest.json            the base's manifest, the first stage's new digest, a ``finetuned``
                                 entry (run, step, base model and its digests); written last
    OUT/first_stage/params/      the fine-tuned parameters (Orbax, float32)
    OUT/first_stage/config.json  the base's (the run may not change the architecture), as is
    OUT/first_stage/tokenizer.json
    OUT/second_stage/ ...        every other component of the base, hard-linked where the
                                 filesystem allows (no extra disk space), copied otherwise
    OUT/first_stage.pt           with ``torch=True``: the same weights as a released-layout PyTorch
                                 checkpoint (written without torch); the reference code loads it
                                 as it loads the released ``first_stage.pt`` (its fine-tuning and
                                 inference scripts take the path), next to the converted model

The directory is built in a temporary sibling (``.OUT.partial-*``) and renamed into place once
complete: a failure or Ctrl-C at any point leaves no ``OUT`` (or the previous one, untouched) and
no temporary directory. ``OUT`` may not be the base model, lie inside it or contain it; an
existing non-empty ``OUT`` is replaced only with ``overwrite=True`` and only if it is a model
directory. Every refusal is one line (:class:`ExportError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from convert_weights import write_released_gpt
from mvjax.core.atomic import staged_dir
from mvjax.core.errors import MvjaxError
from mvjax.io.checkpoint import (
    MANIFEST,
    gpt_stage_config,
    read_manifest,
    save_tree,
    tree_digest,
)
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt import abstract_params
from mvjax.text.tokenizer import TokenizerSpec

STAGE = "first_stage"
TORCH_FILE = "first_stage.pt"
# Manifest fields of a quantised first stage: the exported tree is float32 in the converted layout.
_QUANTISED_FIELDS = ("quantize", "quantize_embedding", "layout")


class ExportError(MvjaxError, ValueError):
    """An export that cannot be done as asked (bad OUT, a base model that does not fit, quantised weights)."""


def check_out(out: str | os.PathLike, base: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """``out`` if a model directory may be written there (checked again when the export starts)."""
    out = Path(out)
    where = out.resolve()
    if base is not None:
        home = Path(base).resolve()
        if where == home:
            raise ExportError(f"--out {out} is the base model itself; choose a new directory")
        if home in where.parents:
            raise ExportError(f"--out {out} lies inside the base model {home}; choose a directory outside it")
        if where in home.parents:
            raise ExportError(f"--out {out} contains the base model {home}; choose another directory")
    if out.is_symlink():
        raise ExportError(f"--out {out} is a symbolic link; give the real directory")
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise ExportError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
            if not (out / MANIFEST).is_file():
                raise ExportError(f"--out {out} is not a model directory; refusing to replace it even with --overwrite")
    return out


def _plain(tree: Any) -> Any:
    """Nested mappings (FrozenDict ...) as plain dicts, so tree structures compare by keys only."""
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def float_tree(config: GPTConfig, params: Mapping[str, Any]) -> dict:
    """``params`` as float32 numpy arrays, checked against the converted layout of ``config``."""
    params = _plain(params)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            raise ExportError(f"the first-stage parameters are quantised ({jax.tree_util.keystr(path)} is {dtype}); "
                              "export the float parameters")
    expected = abstract_params(config)
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(expected):
        have = {jax.tree_util.keystr(p) for p, _ in leaves}
        want = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]}
        diff = sorted(have - want) or sorted(want - have)
        raise ExportError(f"the first-stage parameters are not in the converted layout ({diff[0] if diff else 'tree'} "
                          "differs; a quantised or decode-layout tree cannot be exported)")

    def check(path, leaf, want):
        if tuple(leaf.shape) != tuple(want.shape):
            raise ExportError(f"parameter {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}, "
                              f"the base model's first stage expects {tuple(want.shape)}")
        return np.ascontiguousarray(np.asarray(leaf).astype(np.float32, copy=False))

    return jax.tree_util.tree_map_with_path(check, params, expected)


def _base_first_stage(base: Path, config: GPTConfig, tokenizer_spec: TokenizerSpec | None) -> tuple[dict, TokenizerSpec]:
    """The base's manifest and tokenizer, after checking that ``config`` / ``tokenizer_spec`` match them."""
    manifest = read_manifest(base)
    if STAGE not in manifest.get("components", {}):
        raise ExportError(f"the base model {base} holds no first stage")
    stage = base / STAGE
    base_config = gpt_stage_config(base, STAGE)
    if base_config != config:
        fields = [k for k, v in config.to_dict().items() if base_config.to_dict().get(k) != v]
        raise ExportError(f"the run's first-stage config differs from the base model's ({', '.join(fields)}); "
                          f"the export keeps {base}'s config")
    base_spec = TokenizerSpec.from_json_file(stage / "tokenizer.json")
    spec = getattr(tokenizer_spec, "spec", tokenizer_spec)
    if spec is not None and spec != base_spec:
        raise ExportError(f"the run's tokenizer differs from the base model's ({base / STAGE / 'tokenizer.json'})")
    return manifest, base_spec


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link ``src`` to ``dst``; copy it where links are impossible (other filesystem, no permission)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _provenance(base: Path, manifest: dict, extra: Mapping[str, Any] | None) -> dict:
    entry = manifest["components"][STAGE]
    record = {
        "base_model": str(base.resolve()),
        "base_manifest_sha256": hashlib.sha256((base / MANIFEST).read_bytes()).hexdigest(),
        "base_first_stage_sha256": entry.get("params_sha256"),
        **_json_safe(dict(extra or {})),
    }
    if "finetuned" in manifest:  # the base was itself exported from a run: keep its record
        record["base_finetuned"] = manifest["finetuned"]
    return record


def _write_first_stage(base: Path, staging: Path, tree: dict) -> None:
    dst = staging / STAGE
    dst.mkdir()
    for item in sorted((base / STAGE).iterdir()):
        if item.name == "params":
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(item), str(dst / item.name))
    save_tree(dst / "params", tree)


def export_model(base_model: str | os.PathLike, config: GPTConfig, params: Mapping[str, Any],
                 tokenizer_spec: TokenizerSpec | None, out: str | os.PathLike, torch: bool = False,
                 log: Callable[[str], None] = print, provenance: Mapping[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write the model directory ``out``: ``params`` (the full fine-tuned first stage, float, in the
    converted layout) with every other component of ``base_model``. ``provenance`` (run directory,
    step ...) goes into the manifest's ``finetuned`` entry. ``torch``: also ``out/first_stage.pt``
    in the released layout. Returns ``out``."""
    base = Path(base_model)
    manifest, base_spec = _base_first_stage(base, config, tokenizer_spec)
    out = check_out(out, base, overwrite)
    tree = float_tree(config, params)
    digest = tree_digest(tree)
    record = _provenance(base, manifest, provenance)

    with staged_dir(out) as staging:
        for name in sorted(manifest["components"]):
            if name != STAGE:
                log(f"linking {base / name} -> {out / name}")
                shutil.copytree(base / name, staging / name, copy_function=_link_or_copy)
        log(f"writing the fine-tuned first stage -> {out / STAGE}")
        _write_first_stage(base, staging, tree)
        if torch:
            log(f"writing {out / TORCH_FILE} (released PyTorch layout)")
            extra = {f"mvjax_{k}": v for k, v in record.items() if isinstance(v, (bool, int, float, str))}
            write_released_gpt(staging / TORCH_FILE, config, tree, base_spec, extra)
        entry = {k: v for k, v in manifest["components"][STAGE].items() if k not in _QUANTISED_FIELDS}
        new_manifest = {**manifest, "components": {**manifest["components"], STAGE: {**entry, "params_sha256": digest}},
                        "finetuned": record}
        (staging / MANIFEST).write_text(json.dumps(new_manifest, indent=2, sort_keys=True) + "\n")
        check_out(out, base, overwrite)  # nothing appeared at OUT meanwhile
    log(f"exported {out}")
    return out
