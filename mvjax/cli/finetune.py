"""``python -m mvjax.finetune prepare|train|export``: fine-tune the first stage on your own voice data.

    python -m mvjax.finetune prepare --model MODEL --train train.csv --val val.csv --out DATA
    python -m mvjax.finetune train   --model MODEL --data DATA --out RUN [--steps N ...]
    python -m mvjax.finetune export  --run RUN [--step N|best] --out MODEL2 [--torch]

Each subcommand lives in its own module (``finetune_prepare``, ``finetune_train``,
``finetune_export``), which adds its arguments with ``add_arguments(parser)`` and runs with
``run(args) -> exit status``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mvjax.cli.common import guarded

SUBCOMMANDS = {
    "prepare": ("mvjax.cli.finetune_prepare", "encode clips, embed speakers and build token rows once"),
    "train": ("mvjax.cli.finetune_train", "train the first stage (last blocks and/or LoRA), with checkpoints"),
    "export": ("mvjax.cli.finetune_export", "write a complete model directory from a training run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mvjax.finetune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,train,export}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return guarded(lambda: module.run(args))


if __name__ == "__main__":
    sys.exit(main())
