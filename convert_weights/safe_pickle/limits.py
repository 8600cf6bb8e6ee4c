"""The safe loader's limits, its errors, and how untrusted values appear in error messages."""

from __future__ import annotations

import reprlib
import sys
from typing import Any

from mvjax.core.errors import MvjaxError

MAX_ZIP_ENTRIES = 100_000
MAX_COMPRESSION_RATIO = 16
MAX_PICKLE_BYTES = 64 << 20
MAX_PICKLE_OPS = 2_000_000
MAX_CALL_BYTES = 128 << 20
MAX_INT_BYTES = 1024
MAX_NESTING = 100
MAX_OBJECT_VISITS = 2_000_000
MAX_NDIM = 64
MAX_COMPOSITE_KEYS = 4096
_HASH_MODULUS = sys.hash_info.modulus  # ints are hashed modulo this (2**61 - 1 on 64-bit builds)
TENSOR_COPY_SLACK = 32 << 20
_MAX_LINE = 1024  # GLOBAL's module / name lines
_SMALL_ENTRY = 64  # byteorder
_CHUNK = 1 << 20


class CheckpointError(MvjaxError, ValueError):
    """A checkpoint file that cannot be read as a PyTorch archive."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that references a global outside the allow-list, or tries to change one."""


class _Malformed(Exception):
    """Raised inside the interpreter; :func:`load_checkpoint` adds the file and position."""


class _Unsafe(_Malformed):
    pass


def _short(obj: Any, limit: int = 80) -> str:
    """A bounded one-line repr for error messages."""
    try:
        text = reprlib.repr(obj)
    except Exception:  # noqa: BLE001 - any repr failure: fall back to the type
        text = f"<{type(obj).__name__}>"
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip(text: str, limit: int = 120) -> str:
    """A string for an error message: one line, bounded, control characters escaped."""
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."
