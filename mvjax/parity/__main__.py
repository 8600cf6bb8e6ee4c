"""Check mvjax against a reference fixture directory.

    python -m mvjax.parity FIXTURE_DIR [--only tokenizer,stage1-forward,stage2]

The fixture directory has the layout of ``shared/fixtures/metavoice_ref`` (see its
README): released-layout checkpoints with small random weights and the arrays the
original PyTorch code produced from them. The checkpoints are converted with our
converter into a temporary directory, loaded through the normal runtime path, and
every check prints one line::

    PASS|FAIL <component> <check> max_err=<x> tol=<y>

The exit status is non-zero when any requested check fails or a requested
component is not implemented yet. Every size is read from the fixture files.
"""

from __future__ import annotations

import argparse
import sys

from mvjax.cli.common import exit_now, fail
from mvjax.core.errors import MvjaxError
from mvjax.parity import COMPONENTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvjax.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture_dir", help="fixture directory (layout of shared/fixtures/metavoice_ref)")
    parser.add_argument("--only", help=f"comma-separated components: {','.join(COMPONENTS)}")
    parser.add_argument("--matmul-precision", choices=["highest", "high", "default"],
                        help="float32 matmul precision to certify (default: the runtime's, $MVJAX_MATMUL_PRECISION "
                             "or 'highest')")
    args = parser.parse_args(argv)
    only = None
    if args.only:
        only = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = [c for c in only if c not in COMPONENTS]
        if unknown:
            print(f"error: unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}", file=sys.stderr)
            return 2
    from mvjax.parity.checks import run  # heavy (jax, the model stack): loaded once the flags are checked

    try:
        results = run(args.fixture_dir, only, matmul_precision=args.matmul_precision)
    except (MvjaxError, OSError) as exc:
        return fail(str(exc))
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    exit_now(main())
