"""What every mvjax command does the same way: one-line errors, exit codes, a clean exit."""

from __future__ import annotations

import os
import sys
from typing import Callable

from mvjax.core.errors import MvjaxError


def fail(message: str) -> int:
    """Print ``error: message`` (its first line) on stderr; the exit status 1."""
    print(f"error: {message.strip().splitlines()[0] if message.strip() else 'failed'}", file=sys.stderr)
    return 1


def guarded(run: Callable[[], int]) -> int:
    """``run()``, with every failure as one line and exit status 1: an :class:`MvjaxError` says what is
    wrong; anything else (a bug) gets its type and first line (``MVJAX_DEBUG=1`` re-raises it)."""
    try:
        return run()
    except MvjaxError as exc:
        return fail(str(exc) or type(exc).__name__)
    except KeyboardInterrupt:
        return fail("interrupted")
    except Exception as exc:  # noqa: BLE001 - the user sees one line either way
        if os.environ.get("MVJAX_DEBUG"):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return fail(f"{type(exc).__name__}: {detail} (set MVJAX_DEBUG=1 for the traceback)")


def exit_now(code: int) -> None:
    """End the process with ``code``. After a failure, skip interpreter teardown: background I/O threads
    (tensorstore reads behind a damaged checkpoint) would otherwise print tracebacks after our one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(0)
