"""Atomic file writes: the one way mvjax writes a file a user will read.

A file appears under its name complete or not at all: bytes go to a temporary file beside the
target (same directory, so the final ``os.replace`` is a rename on one filesystem), which is
flushed and renamed over the target only after everything was written. Any failure (a full
disk, Ctrl-C, an encoder error) removes the temporary file and leaves the target as it was.
The result gets the permissions a plain ``open(path, "w")`` would give (``0o666`` less the
process umask), not ``mkstemp``'s private ``0o600``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is renamed to ``path``.

    For writers that want a file name (``soundfile``, ``numpy.savez``); the temporary name ends
    in ``suffix`` for writers that pick a format from the extension.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (OSError, e.g. ENOSPC, propagates with the target untouched)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


# --- Directories ---------------------------------------------------------------------------
# A directory output (a converted model, prepared data, an export) is built in a staging
# directory beside its target and renamed into place once complete.


def missing_parents(directory: str | os.PathLike) -> list[Path]:
    """The directories ``mkdir -p directory`` would create, deepest first (to remove after a failure)."""
    missing, probe = [], Path(directory).absolute()
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    return missing


def replace_dir(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished directory ``new`` to ``out``. An absent or empty ``out`` is replaced at once;
    an existing one is set aside first, put back if the rename fails, and removed once ``new`` is in place."""
    import shutil

    new, out = Path(new), Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
