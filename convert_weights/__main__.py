"""python -m convert_weights --model-dir DIR --out OUT [--quantize int8|bf16]"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert_weights",
        description="Convert released MetaVoice-1B checkpoints (first_stage.pt, second_stage.pt, ...) "
        "into an mvjax model directory (Orbax parameters + JSON configs + tokenizers).",
    )
    parser.add_argument("--model-dir", required=True, help="directory holding the released .pt files")
    parser.add_argument("--out", required=True, help="output model directory (replaced atomically if it exists)")
    parser.add_argument("--quantize", choices=["int8", "bf16"],
                        help="store the first stage quantised for decoding: int8 (per output channel, about a "
                        "quarter of the float32 size, faster on CPU) or bf16 (for GPU/TPU)")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)

    from convert_weights.convert import convert_directory
    from convert_weights.mapping import ConversionError
    from convert_weights.safe_pickle import CheckpointError
    from mvjax.nn.config import ConfigError
    from mvjax.text.tokenizer import TextError

    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        manifest = convert_directory(args.model_dir, args.out, log=log, quantize=args.quantize)
    except (CheckpointError, ConversionError, ConfigError, TextError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log(f"wrote {args.out}: {', '.join(manifest['components'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
