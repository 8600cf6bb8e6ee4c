"""Converted model directories: Orbax parameter trees + JSON configs + tokenizers.

Layout written by ``python -m convert_weights``::

    OUT/manifest.json                 written last; lists components and a digest of each tree
    OUT/first_stage/config.json       GPTConfig
    OUT/first_stage/tokenizer.json
    OUT/first_stage/params/           Orbax checkpoint of the parameter tree
    OUT/second_stage/...

A directory without a valid ``manifest.json`` is not a model (an interrupted
conversion never produces one). Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from mvjax.core.atomic import interrupts_deferred
from mvjax.core.errors import MvjaxError
from mvjax.io.quantize import MODES, abstract_decode_params
from mvjax.nn.config import GPTConfig
from mvjax.nn.diffusion_config import DiffusionConfig
from mvjax.nn.diffusion_unet import abstract_params as unet_shapes
from mvjax.nn.encodec import EncodecConfig
from mvjax.nn.encodec import abstract_params as encodec_shapes
from mvjax.nn.gpt import abstract_params as gpt_shapes
from mvjax.nn.speaker_encoder import SpeakerEncoderConfig
from mvjax.nn.speaker_encoder import abstract_params as speaker_shapes
from mvjax.text.tokenizer import Tokenizer, TokenizerSpec

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ModelDirError(MvjaxError, ValueError):
    """A converted model directory that is missing, incomplete or corrupt."""


def tree_digest(tree: Mapping[str, Any]) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes, in sorted path order."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_tree(path: Path, tree: Mapping[str, Any]) -> None:
    """Write ``tree`` as an Orbax checkpoint at ``path``; returns once every file is written. Orbax
    finishes saves in background threads, so a Ctrl-C is held until they are done
    (:func:`~mvjax.core.atomic.interrupts_deferred`): nothing writes into ``path`` after the
    interrupt surfaces."""
    with interrupts_deferred(), ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), tree)


def _restore_window_gb(abstract) -> int:
    """Orbax's in-flight restore budget (whole GB, at least the largest leaf): read one large
    array at a time, so a 5 GB first stage peaks at ~7.2 GB instead of ~9 GB while loading."""
    largest = max((math.prod(leaf.shape) * jax.numpy.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree_util.tree_leaves(abstract)), default=0)
    return max(1, math.ceil(largest / 1e9))


# Checkpointers whose restore failed: kept open for the life of the process. tensorstore may still
# deliver callbacks for reads that were in flight when the error surfaced; had the checkpointer
# (and its asyncio loop) been closed, each of them prints an "Event loop is closed" traceback.
_FAILED_CHECKPOINTERS: list = []


class _StderrCapture:
    """Holds fd 2 (what C++ threads and Python write to stderr) in a temporary file while a
    restore runs. On success the captured text is written out as it came; after a failure it is
    dropped once the reads still in flight have finished: tensorstore completes them on its own
    threads and posts to the asyncio loop orbax has already closed, and each prints an
    ``Event loop is closed`` traceback, noise around the one-line error. Measured on a damaged
    model: without this about one run in three printed such tracebacks, with it 12 of 12 runs
    print exactly the one line."""

    DRAIN_SECONDS = 1.0

    def __init__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)

    def release(self, replay: bool) -> None:
        if not replay:
            time.sleep(self.DRAIN_SECONDS)
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if replay:
            self.file.seek(0)
            text = self.file.read()
            if text:
                os.write(2, text)
        self.file.close()


def _short_reason(exc: BaseException) -> str:
    """The first line of a tensorstore/orbax error, without the JSON spec it appends."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(" [tensorstore_spec=")[0][:300]


def restore_tree(path: Path, abstract: Mapping[str, Any] | None = None) -> dict:
    """Restore an Orbax tree; a damaged or incomplete checkpoint is a one-line :class:`ModelDirError`."""
    path = Path(path).absolute()
    if abstract is None:
        ckptr, kwargs = ocp.StandardCheckpointer(), {}
    else:
        handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=_restore_window_gb(abstract))
        ckptr, kwargs = ocp.Checkpointer(handler), {"args": ocp.args.StandardRestore(abstract)}
    capture = _StderrCapture()
    try:
        tree = ckptr.restore(path, **kwargs)
    except BaseException as exc:
        _FAILED_CHECKPOINTERS.append(ckptr)
        capture.release(replay=False)
        if not isinstance(exc, Exception):
            raise
        raise ModelDirError(f"{path.parent}: its parameters cannot be read ({_short_reason(exc)}); the files are "
                            "damaged or incomplete: convert the checkpoints again") from None
    capture.release(replay=True)
    ckptr.close()
    return tree


def read_manifest(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise ModelDirError(
            f"{model_dir} has no {MANIFEST}: not a converted model (or an interrupted conversion); "
            "run python -m convert_weights --model-dir CHECKPOINTS --out DIR"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    return manifest


def model_components(model_dir: str | Path, required: tuple[str, ...] = ()) -> set[str]:
    """The components a converted model directory holds; ModelDirError if any of ``required`` is missing."""
    model_dir = Path(model_dir)
    have = set(read_manifest(model_dir).get("components", {}))
    missing = set(required) - have
    if missing:
        raise ModelDirError(f"{model_dir} lacks {', '.join(sorted(missing))} (has: {', '.join(sorted(have))})")
    return have


def _component(model_dir: Path, name: str) -> dict:
    manifest = read_manifest(model_dir)
    entry = manifest.get("components", {}).get(name)
    if entry is None:
        have = ", ".join(manifest.get("components", {})) or "nothing"
        raise ModelDirError(f"{model_dir} holds no {name} (has: {have})")
    return entry


def component_config(model_dir: str | Path, name: str) -> dict:
    """The ``config.json`` of component ``name`` (no weights read)."""
    return json.loads((Path(model_dir) / name / "config.json").read_text())


def gpt_stage_config(model_dir: str | Path, stage: str) -> GPTConfig:
    """The GPTConfig of one stage of a converted directory (no weights read)."""
    return GPTConfig.from_dict(component_config(model_dir, stage))


def _restore_component(model_dir: Path, name: str, abstract, verify: bool) -> tuple[dict, dict]:
    """(params, manifest entry) of component ``name``, optionally checked against its digest."""
    entry = _component(model_dir, name)
    params = restore_tree(model_dir / name / "params", abstract)
    if verify and tree_digest(params) != entry["params_sha256"]:
        raise ModelDirError(f"{model_dir / name}: parameters do not match the digest in {MANIFEST}")
    return params, entry


def load_speaker_encoder(model_dir: str | Path, verify: bool = False):
    """(SpeakerEncoderConfig, params, weights digest) from a converted directory."""
    model_dir = Path(model_dir)
    _component(model_dir, "speaker_encoder")
    config = SpeakerEncoderConfig.from_dict(component_config(model_dir, "speaker_encoder"))
    params, entry = _restore_component(model_dir, "speaker_encoder", speaker_shapes(config), verify)
    return config, params, entry["params_sha256"]


def load_encodec(model_dir: str | Path, verify: bool = False):
    """(EncodecConfig, params) of the 24 kHz codec from a converted directory."""
    model_dir = Path(model_dir)
    _component(model_dir, "encodec")
    config = EncodecConfig.from_dict(component_config(model_dir, "encodec"))
    params, _ = _restore_component(model_dir, "encodec", encodec_shapes(config), verify)
    return config, params


def load_mbd(model_dir: str | Path, verify: bool = False):
    """(DiffusionConfig, params) of the multi-band diffusion decoder from a converted directory."""
    model_dir = Path(model_dir)
    _component(model_dir, "mbd")
    config = DiffusionConfig.from_dict(component_config(model_dir, "mbd"))
    abstract = {}
    for b, band in enumerate(config.bands):
        abstract[f"band_{b}"] = unet_shapes(band.unet)
        if band.processor.use:
            n = band.processor.n_bands
            shape = {"counts": (1,), "sum_x": (n,), "sum_x2": (n,), "sum_target_x2": (n,)}
            abstract[f"processor_{b}"] = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shape.items()}
    params, _ = _restore_component(model_dir, "mbd", abstract, verify)
    return config, params


def load_gpt_stage(model_dir: str | Path, stage: str, verify: bool = False) -> tuple[GPTConfig, dict, Tokenizer]:
    """Load one GPT stage (``first_stage`` or ``second_stage``) from a converted directory.

    A first stage converted with ``--quantize`` (its manifest entry names the mode) comes back
    as stored: already in the decoder's layout with quantised matrices (:mod:`mvjax.io.quantize`),
    which :class:`mvjax.inference.decode.FirstStageDecoder` uses as is; no float32 copy is built."""
    model_dir = Path(model_dir)
    entry = _component(model_dir, stage)
    config = gpt_stage_config(model_dir, stage)
    tokenizer = Tokenizer(TokenizerSpec.from_json_file(model_dir / stage / "tokenizer.json"))
    if entry.get("quantize"):
        if entry["quantize"] not in MODES or entry.get("layout") != "decode":
            raise ModelDirError(f"{model_dir / stage}: unknown quantisation {entry['quantize']!r} "
                                f"(layout {entry.get('layout')!r}) in {MANIFEST}")
        abstract = abstract_decode_params(config, entry["quantize"], embedding=bool(entry.get("quantize_embedding")))
    else:
        abstract = gpt_shapes(config)
    params, _ = _restore_component(model_dir, stage, abstract, verify)
    return config, params, tokenizer
