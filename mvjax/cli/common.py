"""What every mvjax command does the same way: one-line errors, exit codes, a clean exit."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from mvjax.core.errors import MvjaxError


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that states each option's default once: argparse's ``(default: X)`` is appended unless
    the help already says what the default is, and left out where there is nothing to say (None, an
    off switch, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False or action.default == []:
            return text
        return super()._get_help_string(action)


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
