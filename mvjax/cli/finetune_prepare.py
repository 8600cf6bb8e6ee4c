"""``python -m mvjax.finetune prepare``: encode clips, embed speakers and build token rows once.

    python -m mvjax.finetune prepare --model MODEL --train train.csv [--val val.csv] --out DATA

Listings are the reference's ``audio_files|captions`` CSV or JSONL (``{"audio": ..., "text": ...}``
per line); see :mod:`mvjax.train.prepare`. ``DATA`` is built beside itself and renamed into place
when complete, so an interrupted run leaves the old directory (or none). The directory it is built in,
``.DATA.tmp-<pid>.<start>-<random>`` beside ``DATA``, names its owner (:mod:`mvjax.core.scratch`): a run
removes those of runs that were killed, never one of a run still going. SIGTERM stops a run as Ctrl-C
does: one line, its temporary directory removed, exit status 143.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from mvjax.cli.common import fail
from mvjax.core.atomic import staged_dir
from mvjax.core.errors import MvjaxError
from mvjax.core.precision import apply as apply_precision
from mvjax.core.scratch import sweep_orphans
from mvjax.train.data import read_listing
from mvjax.train.prepare import MIN_CLIP_SECONDS, SKIP_REASONS, check_min_seconds, prepare_data

# The exit status of a run stopped by SIGTERM (128 + the signal's number, as a shell reports it).
SIGTERM_STATUS = 128 + signal.SIGTERM


class UsageError(MvjaxError, ValueError):
    """Arguments that cannot work together."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C, so every ``finally`` removes what the run made."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("A clip that cannot be used is skipped, named with its reason, and counted in the summary and "
                     "DATA/manifest.json: " + "; ".join(f"{k}: {v}" for k, v in SKIP_REASONS.items()) + ".")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", help="converted model directory, released checkpoints directory or hub repo id "
                                     "(needs first_stage, encodec and speaker_encoder)")
    src.add_argument("--demo", action="store_true", help="use the small random demo model (for trying the tools)")
    parser.add_argument("--train", required=True, type=Path,
                        help="training listing: .csv (audio_files|captions, '|'-separated) or .jsonl "
                             "({\"audio\": ..., \"text\": ...} per line); relative paths are read from its folder; "
                             "a caption that is one word ending in .txt is read from that file")
    parser.add_argument("--val", type=Path, help="validation listing, same formats (optional)")
    parser.add_argument("--out", required=True, type=Path, help="data directory to write (DATA)")
    parser.add_argument("--ctx-window", type=int, default=None,
                        help="tokens per training row minus one (even; default and maximum: the first stage's block size)")
    parser.add_argument("--truncate-long", action="store_true",
                        help="keep clips whose text + audio tokens do not fit the window, cut at the window as the "
                             "reference does (their audio then has no end, which teaches the model never to stop); "
                             "by default they are skipped")
    parser.add_argument("--min-seconds", type=float, default=MIN_CLIP_SECONDS,
                        help=f"skip clips shorter than this (default {MIN_CLIP_SECONDS:g} s)")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="keep every copy of a row repeating an earlier one (same audio file content and the "
                             "same text after normalisation); by default only the first is kept, the others are "
                             "skipped as duplicate")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="print only skips, the summary and errors")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_output(out: Path, inputs: Iterable[Path], overwrite: bool) -> None:
    """Refuse an output that is a file, holds an input, or is a non-empty directory (without ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    for path in inputs:
        if _inside(path, out):
            raise UsageError(f"--out {out} would overwrite an input ({path}); choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _import_native_modules() -> None:
    """The modules with native extensions that preparing imports on its way (soxr through the speaker
    encoder's features, tensorstore through the checkpoint reader, jaxlib): imported before SIGTERM is
    handled, because the handler's exception raised inside a native module's initialisation aborts the
    interpreter (C++ terminate, exit -6) instead of unwinding."""
    import jax.numpy  # noqa: F401

    import mvjax.inference.speaker  # noqa: F401
    import mvjax.io.checkpoint  # noqa: F401
    import mvjax.nn.encodec  # noqa: F401


def run(args: argparse.Namespace) -> int:
    """Prepare the data; SIGTERM is handled as Ctrl-C (one line, nothing left behind) with exit status 143."""
    _import_native_modules()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except Terminated:
        fail("terminated (SIGTERM)")
        return SIGTERM_STATUS
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    if not args.demo and not args.model:
        raise UsageError("give --model (or --demo for the random demo model)")
    check_min_seconds(args.min_seconds)
    listings = {"train": read_listing(args.train)}
    if args.val is not None:
        listings["val"] = read_listing(args.val)
    out = Path(args.out)
    inputs = [args.train] + ([args.val] if args.val is not None else [])
    for entries in listings.values():
        inputs += [p for e in entries for p in (e.audio, e.caption_file) if p is not None]
    if args.model and Path(args.model).exists():
        inputs.append(Path(args.model))
    check_output(out, inputs, args.overwrite)

    def log(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    def info(message: str) -> None:
        if not args.quiet:
            log(message)

    # heavy (jax, the model loaders): loaded only once the listings and --out are checked
    if args.demo:
        from mvjax.sources.demo import demo_model_dir

        info("demo: a small model with random weights; prepared data from it only exercises the tools")
        model = demo_model_dir(log=info)
    else:
        from mvjax.sources.resolve import resolve_model

        model = resolve_model(args.model, log_fn=info)
    if _inside(model, out):
        raise UsageError(f"--out {out} would overwrite an input (the model {model}); choose another directory")
    from mvjax.core.compile_cache import enable_compilation_cache  # heavy (jax): as above

    apply_precision()
    enable_compilation_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.tmp-"
    stale = sweep_orphans(prefix, out.parent)  # left by runs that were killed (never a running one's)
    if stale:
        info(f"removed {stale} unfinished {prefix}* director{'y' if stale == 1 else 'ies'} of stopped runs")
    with staged_dir(out, prefix=prefix, owned=True) as tmp:  # named for sweep_orphans
        manifest = prepare_data(model, listings, tmp, ctx_window=args.ctx_window, truncate_long=args.truncate_long,
                                log=info, warn=log, min_seconds=args.min_seconds,
                                keep_duplicates=args.keep_duplicates)
        check_output(out, [], args.overwrite)  # nothing appeared there meanwhile
    rows = ", ".join(f"{name} {entry['rows']}" for name, entry in manifest["splits"].items())
    info(f"wrote {out} ({rows} rows, ctx_window {manifest['ctx_window']})")
    return 0
