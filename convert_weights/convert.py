"""Convert the released MetaVoice checkpoints in a directory into a converted model directory.

Every component found under its released file name is converted; the output is
built in a temporary sibling directory, ``manifest.json`` is written last, and the
directory is moved into place only when complete, so an interrupted run never
leaves an ``OUT`` that loads.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from convert_weights.safe_pickle import load_checkpoint
from mvjax.io.checkpoint import FORMAT_VERSION, MANIFEST, save_tree, tree_digest

# Released file name -> component name in the converted directory.
GPT_FILES = {"first_stage.pt": "first_stage", "second_stage.pt": "second_stage"}


def _write_component(dst: Path, kind: str, src: Path, config: dict, params, extra: dict | None = None) -> dict:
    """config.json (+ extra files) and the Orbax tree under ``dst``; returns the manifest entry."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, text in (extra or {}).items():
        (dst / name).write_text(text)
    save_tree(dst / "params", params)
    return {"kind": kind, "source": src.name, "params_sha256": tree_digest(params)}


def _convert_gpt(src: Path, dst: Path, quantize: str | None = None) -> dict:
    """``quantize`` (causal first stage only): store the decoder's layout with int8 or bfloat16
    matrices (:mod:`mvjax.io.quantize`) instead of the float32 tree; the manifest entry records it."""
    from convert_weights.gpt import convert_gpt_checkpoint

    config, params, tokenizer = convert_gpt_checkpoint(load_checkpoint(src), source=str(src))
    stored = {}
    if quantize is not None:
        from mvjax.io.quantize import QUANTIZE_EMBEDDING, prepare_quantized_params

        params = prepare_quantized_params(config, params, quantize)
        stored = {"quantize": quantize, "quantize_embedding": QUANTIZE_EMBEDDING, "layout": "decode"}
    entry = _write_component(dst, "gpt", src, config.to_dict(), params, {"tokenizer.json": tokenizer.to_json()})
    return {**entry, **stored}


def _convert_speaker(src: Path, dst: Path) -> dict:
    from convert_weights.speaker import convert_speaker_checkpoint

    config, params = convert_speaker_checkpoint(load_checkpoint(src), source=str(src))
    return _write_component(dst, "speaker_encoder", src, config.to_dict(), params)


def _convert_encodec(src: Path, dst: Path) -> dict:
    from convert_weights.encodec import convert_encodec_state

    config, params = convert_encodec_state(load_checkpoint(src), source=str(src))
    return _write_component(dst, "encodec", src, config.to_dict(), params)


def _convert_mbd(src: Path, dst: Path) -> dict:
    from convert_weights.mbd import convert_mbd_checkpoint
    from convert_weights.safe_pickle import OMEGACONF_ALLOWED

    config, params = convert_mbd_checkpoint(load_checkpoint(src, OMEGACONF_ALLOWED), source=str(src))
    return _write_component(dst, "mbd", src, config, params)


# Released file name (a glob) -> (component name in the converted directory, converter).
CONVERTERS: dict[str, tuple[str, Callable[[Path, Path], dict]]] = {
    **{fname: (name, _convert_gpt) for fname, name in GPT_FILES.items()},
    "speaker_encoder.pt": ("speaker_encoder", _convert_speaker),
    "encodec_24khz*.th": ("encodec", _convert_encodec),
    "mbd_comp_*.pt": ("mbd", _convert_mbd),
}


def find_components(model_dir: Path) -> dict[str, Path]:
    """Released pattern -> the file in ``model_dir`` that matches it (one per pattern)."""
    found = {}
    for pattern in CONVERTERS:
        matches = sorted(p for p in model_dir.glob(pattern) if p.is_file())
        if len(matches) > 1:
            raise FileExistsError(f"{model_dir} holds several files matching {pattern}: {', '.join(p.name for p in matches)}")
        if matches:
            found[pattern] = matches[0]
    return found


def convert_directory(model_dir: str | Path, out: str | Path, log: Callable[[str], None] = lambda s: None,
                      quantize: str | None = None) -> dict:
    """Convert every known checkpoint in ``model_dir`` into ``out``; returns the manifest.
    ``quantize`` (``"int8"`` or ``"bf16"``): store the first stage quantised (see :func:`_convert_gpt`)."""
    from mvjax.io.quantize import check_mode

    quantize = check_mode(quantize)
    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    found = find_components(model_dir)
    if not found:
        raise FileNotFoundError(f"{model_dir} contains none of: {', '.join(CONVERTERS)}")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a converted model directory; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)
    try:
        components = {}
        for fname, path in sorted(found.items()):
            name, converter = CONVERTERS[fname]
            if quantize is not None and name == "first_stage":
                converter = functools.partial(_convert_gpt, quantize=quantize)
                log(f"converting {path} -> {out / name} ({quantize} weights)")
            else:
                log(f"converting {path} -> {out / name}")
            components[name] = converter(path, staging / name)
        manifest = {"format_version": FORMAT_VERSION, "components": components}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished ``new`` into ``out``, replacing a previous conversion."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
