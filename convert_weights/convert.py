"""Convert the released MetaVoice checkpoints in a directory into a converted model directory.

Every component found under its released file name is converted; the output is
built in a temporary sibling directory, ``manifest.json`` is written last, and the
directory is moved into place only when complete, so an interrupted run never
leaves an ``OUT`` that loads.

Before anything is converted or written, every file is vetted with
:func:`convert_weights.safe_pickle.check_checkpoint` (archive, pickle, tensor layouts; no
storage bytes read, no JAX imported): one bad file refuses the whole directory quickly, and
because a load never changes state that outlives it, files converted beside it are
converted exactly as alone. Whatever a checkpoint's content makes a converter trip over
becomes a one-line :class:`ConversionError` naming the file; on any failure or interrupt
the staging directory (and any parent directory this call created) is removed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from convert_weights.mapping import ConversionError
from convert_weights.safe_pickle import (
    OMEGACONF_ALLOWED,
    CheckpointError,
    check_checkpoint,
    load_checkpoint,
)
from mvjax.core.atomic import staged_dir
from mvjax.nn.config import ConfigError
from mvjax.text.tokenizer import TextError

# Released file name -> component name in the converted directory.
GPT_FILES = {"first_stage.pt": "first_stage", "second_stage.pt": "second_stage"}


def _write_component(dst: Path, kind: str, src: Path, config: dict, params, extra: dict | None = None) -> dict:
    """config.json (+ extra files) and the Orbax tree under ``dst``; returns the manifest entry."""
    # jax: loaded only once every file is vetted (see the module docstring)
    from mvjax.io.checkpoint import save_tree, tree_digest

    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, text in (extra or {}).items():
        (dst / name).write_text(text)
    save_tree(dst / "params", params)
    return {"kind": kind, "source": src.name, "params_sha256": tree_digest(params)}


# Exceptions a converter may raise on content it does not expect (a string where a number
# belongs, a list where a mapping does...): reported as a ConversionError naming the file.
_CONTENT_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
                   ZeroDivisionError)


def _interpret(src: Path, convert: Callable[..., Any], *args, **kwargs) -> Any:
    """Run a checkpoint -> (config, params) converter; every failure is one line naming ``src``."""
    try:
        return convert(*args, **kwargs)
    except CheckpointError:
        raise
    except (ConversionError, ConfigError, TextError) as exc:
        if str(src) in str(exc):
            raise
        raise type(exc)(f"{src}: {exc}") from None
    except _CONTENT_ERRORS as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ConversionError(f"{src}: unexpected checkpoint content ({type(exc).__name__}: {detail})") from None


def _expect_mapping(ckpt: Any, src: Path, what: str) -> Mapping:
    if not isinstance(ckpt, Mapping):
        raise ConversionError(f"{src}: the checkpoint holds {type(ckpt).__name__}, not a dict; not a {what} checkpoint")
    return ckpt


def _check_gpt_meta(ckpt: Mapping, src: Path) -> None:
    """Tokenizer ranks are keyed by bytes; another key type (``bytes(10**12)``...) is refused here."""
    meta = ckpt.get("meta")
    tokenizer = meta.get("tokenizer") if isinstance(meta, Mapping) else None
    ranks = tokenizer.get("mergeable_ranks") if isinstance(tokenizer, Mapping) else None
    if ranks is not None and not isinstance(ranks, Mapping):
        raise ConversionError(f"{src}: meta.tokenizer.mergeable_ranks is {type(ranks).__name__}, not a mapping")
    for key in ranks or ():
        if type(key) is not bytes:
            raise ConversionError(f"{src}: meta.tokenizer.mergeable_ranks has a key of type {type(key).__name__}; expected bytes")


def _convert_gpt(src: Path, dst: Path, quantize: str | None = None) -> dict:
    """``quantize`` (causal first stage only): store the decoder's layout with int8, int4 or bfloat16
    matrices (:mod:`mvjax.io.quantize`, one matrix at a time) instead of the float32 tree; the
    manifest entry records it."""
    # jax: loaded only once every file is vetted (see the module docstring)
    from convert_weights.gpt import convert_gpt_checkpoint

    ckpt = _expect_mapping(load_checkpoint(src), src, "MetaVoice GPT")
    _check_gpt_meta(ckpt, src)
    config, params, tokenizer = _interpret(src, convert_gpt_checkpoint, ckpt, source=str(src))
    del ckpt  # the raw storages: free them before the tree is written
    stored = {}
    if quantize is not None:
        # jax: as above
        from mvjax.io.quantize import QUANTIZE_EMBEDDING, prepare_quantized_params

        params = prepare_quantized_params(config, params, quantize)
        stored = {"quantize": quantize, "quantize_embedding": QUANTIZE_EMBEDDING, "layout": "decode"}
    entry = _write_component(dst, "gpt", src, config.to_dict(), params, {"tokenizer.json": tokenizer.to_json()})
    return {**entry, **stored}


def _convert_speaker(src: Path, dst: Path) -> dict:
    # jax: loaded only once every file is vetted (see the module docstring)
    from convert_weights.speaker import convert_speaker_checkpoint

    ckpt = _expect_mapping(load_checkpoint(src), src, "speaker-encoder")
    config, params = _interpret(src, convert_speaker_checkpoint, ckpt, source=str(src))
    del ckpt  # the raw storages: free them before the tree is written
    return _write_component(dst, "speaker_encoder", src, config.to_dict(), params)


def _convert_encodec(src: Path, dst: Path) -> dict:
    # jax: loaded only once every file is vetted (see the module docstring)
    from convert_weights.encodec import convert_encodec_state

    ckpt = _expect_mapping(load_checkpoint(src), src, "EnCodec")
    config, params = _interpret(src, convert_encodec_state, ckpt, source=str(src))
    del ckpt  # the raw storages: free them before the tree is written
    return _write_component(dst, "encodec", src, config.to_dict(), params)


def _convert_mbd(src: Path, dst: Path) -> dict:
    # jax: loaded only once every file is vetted (see the module docstring)
    from convert_weights.mbd import convert_mbd_checkpoint

    ckpt = _expect_mapping(load_checkpoint(src, OMEGACONF_ALLOWED), src, "multi-band diffusion")
    config, params = _interpret(src, convert_mbd_checkpoint, ckpt, source=str(src))
    del ckpt  # the raw storages: free them before the tree is written
    return _write_component(dst, "mbd", src, config, params)


# Released file name (a glob) -> (component name in the converted directory, converter).
CONVERTERS: dict[str, tuple[str, Callable[[Path, Path], dict]]] = {
    **{fname: (name, _convert_gpt) for fname, name in GPT_FILES.items()},
    "speaker_encoder.pt": ("speaker_encoder", _convert_speaker),
    "encodec_24khz*.th": ("encodec", _convert_encodec),
    "mbd_comp_*.pt": ("mbd", _convert_mbd),
}
# Released file name (a glob) -> the globals its pickle may reference beyond the base allow-list.
EXTRA_ALLOWED: dict[str, Mapping] = {"mbd_comp_*.pt": OMEGACONF_ALLOWED}


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


def vet_components(found: Mapping[str, Path]) -> None:
    """Check every found checkpoint (archive, pickle, tensor layouts, a dict at the top) before
    converting any: :func:`check_checkpoint` reads no storage bytes and imports no JAX."""
    for pattern, path in sorted(found.items()):
        skeleton = check_checkpoint(path, EXTRA_ALLOWED.get(pattern))
        if not isinstance(skeleton, Mapping):
            raise ConversionError(f"{path}: the checkpoint holds {type(skeleton).__name__}, not a dict")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; refusing to replace it")


def convert_directory(model_dir: str | Path, out: str | Path, log: Callable[[str], None] = lambda s: None,
                      quantize: str | None = None, stop_requested: Callable[[], bool] | None = None) -> dict:
    """Convert every known checkpoint in ``model_dir`` into ``out``; returns the manifest.
    ``quantize`` (``"int8"``, ``"int4"`` or ``"bf16"``): store the first stage quantised (see :func:`_convert_gpt`).
    ``stop_requested``: polled before each component and before ``out`` is replaced; when it
    returns True the conversion stops with KeyboardInterrupt (and leaves nothing behind). The CLI
    uses it so that a Ctrl-C that a library swallowed (one landing in a gc callback) still stops."""
    def check_stop() -> None:
        if stop_requested is not None and stop_requested():
            raise KeyboardInterrupt

    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    found = find_components(model_dir)
    if not found:
        raise FileNotFoundError(f"{model_dir} contains none of: {', '.join(CONVERTERS)}")
    _check_out(out)
    vet_components(found)

    # jax: the model-format modules load only now that every file is vetted (see the module docstring)
    from mvjax.io.checkpoint import FORMAT_VERSION, MANIFEST
    from mvjax.io.quantize import check_mode

    quantize = check_mode(quantize)
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a converted model directory; refusing to replace it")
    with staged_dir(out) as staging:
        components = {}
        for fname, path in sorted(found.items()):
            check_stop()
            name, converter = CONVERTERS[fname]
            if quantize is not None and name == "first_stage":
                converter = functools.partial(_convert_gpt, quantize=quantize)
                log(f"converting {path} -> {out / name} ({quantize} weights)")
            else:
                log(f"converting {path} -> {out / name}")
            components[name] = converter(path, staging / name)
        manifest = {"format_version": FORMAT_VERSION, "components": components}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        check_stop()
    return manifest


