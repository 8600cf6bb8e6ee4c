"""``python -m mvjax.finetune export``: a training run's first stage as a complete model directory.

    python -m mvjax.finetune export --run RUN [--step N|best|latest] --out MODEL2 [--torch] [--overwrite]

``MODEL2`` holds the fine-tuned first stage and every other component of the run's base model, in
the converted format: ``python -m mvjax.synthesize --model MODEL2`` and ``mvjax.TTS.load(MODEL2)``
use it as they use any model. ``--torch`` also writes ``MODEL2/first_stage.pt`` in the released
PyTorch layout, which the reference code loads (see :mod:`mvjax.train.export`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_step(text: str) -> int | str:
    """``--step``: a non-negative checkpoint step, ``best`` (lowest validation loss) or ``latest``."""
    if text in ("best", "latest"):
        return text
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number, 'best' or 'latest', got {text!r}") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"a step is >= 0, got {step}")
    return step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="the training run's directory (train --out)")
    parser.add_argument("--step", type=parse_step, default="latest",
                        help="which checkpoint: a step number, 'best' (lowest validation loss) or 'latest' (default)")
    parser.add_argument("--out", type=Path, required=True, help="the new model directory to write")
    parser.add_argument("--torch", action="store_true",
                        help="also write OUT/first_stage.pt in the released PyTorch layout (for the reference code)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --out")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run(args: argparse.Namespace) -> int:
    # heavy (jax, orbax): python -m mvjax.finetune --help builds this command's parser
    from mvjax.train.checkpoints import restore_for_export
    from mvjax.train.export import check_out, export_model

    log = (lambda _message: None) if args.quiet else print
    check_out(args.out, overwrite=args.overwrite)  # before the (slow) restore; again once the base is known
    step = None if args.step == "latest" else args.step
    source = restore_for_export(args.run, step)
    log(f"restored step {source.step} of {args.run} (base model {source.base_model})")
    export_model(source.base_model, source.config, source.params, source.tokenizer_spec, args.out,
                 torch=args.torch, log=log, overwrite=args.overwrite,
                 provenance={"run": str(Path(args.run).resolve()), "step": int(source.step)})
    return 0
