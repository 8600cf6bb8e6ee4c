"""python -m convert_weights --model-dir DIR --out OUT [--quantize int8|int4|bf16]

Exit status: 0 on success; 1 on any error, reported as one line on stderr that names the
file and the problem (a checkpoint that cannot be read safely, one that does not fit its
own config, an OUT that is a file or cannot be written...); 130 when interrupted (Ctrl-C).
On failure or interrupt nothing is left behind: no OUT (an earlier conversion there is
kept unchanged) and no staging directory.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from convert_weights.convert import convert_directory
from mvjax.core.errors import MvjaxError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class _CtrlC:
    """SIGINT while converting: the first one raises KeyboardInterrupt (as Python's default
    handler does) and is remembered, so that one a library swallows (an exception raised inside
    a gc callback is only printed, as "Exception ignored in ...") still stops the conversion at
    its next check; later ones only wait for the cleanup. Swallowed interrupts are not printed."""

    def __init__(self):
        self.requested = False
        self._handler = None
        self._hook = None

    def _on_signal(self, signum, frame):
        if not self.requested:
            self.requested = True
            raise KeyboardInterrupt

    def _on_unraisable(self, unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        self._hook(unraisable)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._handler = signal.signal(signal.SIGINT, self._on_signal)
        self._hook, sys.unraisablehook = sys.unraisablehook, self._on_unraisable
        return self

    def __exit__(self, *exc):
        if self._handler is not None:
            signal.signal(signal.SIGINT, self._handler)
        sys.unraisablehook = self._hook
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert_weights",
        description="Convert released MetaVoice-1B checkpoints (first_stage.pt, second_stage.pt, ...) "
        "into an mvjax model directory (Orbax parameters + JSON configs + tokenizers).",
        epilog="Exit status: 0 success, 1 error (one line on stderr), 130 interrupted. "
        "On failure nothing is written.",
    )
    parser.add_argument("--model-dir", required=True, help="directory holding the released .pt files")
    parser.add_argument("--out", required=True, help="output model directory (replaced atomically if it exists)")
    parser.add_argument("--quantize", choices=["int8", "int4", "bf16"],
                        help="store the first stage quantised for decoding: int8 (per output channel, about a "
                        "quarter of the float32 size, faster on CPU), int4 (4-bit in groups of 64 inputs with a "
                        "float16 scale and minimum each, about a seventh) or bf16 (for GPU/TPU)")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)

    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        with _CtrlC() as ctrl_c:
            return _convert(args, log, ctrl_c)
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _convert(args: argparse.Namespace, log, ctrl_c: _CtrlC) -> int:
    try:
        manifest = convert_directory(args.model_dir, args.out, log=log, quantize=args.quantize,
                                     stop_requested=lambda: ctrl_c.requested)
    except MvjaxError as exc:  # every converter, loader and config error derives from it
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        # The converter's own FileNotFoundError / FileExistsError carry a full message (no errno);
        # a system error (read-only filesystem, permission denied, disk full) gets context.
        context = "" if exc.errno is None else f"converting into {args.out} failed: "
        print(f"error: {context}{_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    log(f"wrote {args.out}: {', '.join(manifest['components'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
