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
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from mvjax.core.scratch import make_owned_dir

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the length of the block, then deliver it.

    For writes that libraries finish in background threads (Orbax saves): a KeyboardInterrupt
    raised in the middle of one leaves those threads writing into a directory that the caller's
    cleanup is already removing. Inside the block a SIGINT is only noted; when the block ends, the
    handler that was installed before it gets the signal (so a CLI's own handler, or Python's
    KeyboardInterrupt, sees it at a point where nothing is half-written). Signals reach the main
    thread only, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            signal.raise_signal(signal.SIGINT)


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
# directory beside its target and renamed into place once complete (:func:`staged_dir`).


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


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, prefix: str | None = None, owned: bool = False) -> Iterator[Path]:
    """Build the directory ``out`` atomically: yield a new staging directory beside it, which replaces
    ``out`` (:func:`replace_dir`) when the block ends cleanly. On any exception (Ctrl-C included) the
    staging directory is removed, and so are the parents of ``out`` this call created (while empty);
    ``out`` is left as it was.

    The staging directory is named ``<prefix><random>`` (default prefix ``.<out name>.partial-``), with
    the owning process in its name too when ``owned`` (:func:`mvjax.core.scratch.make_owned_dir`, for
    :func:`~mvjax.core.scratch.sweep_orphans`). It gets the mode a plain ``mkdir`` would give
    (``0o777`` less the process umask), which ``out`` keeps.
    """
    out = Path(out)
    prefix = f".{out.name}.partial-" if prefix is None else prefix
    created = missing_parents(out.parent)
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if owned:
            staging = Path(make_owned_dir(prefix, out.parent))
        else:
            staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        staging.chmod(0o777 & ~current_umask())
        yield staging
        replace_dir(staging, out)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # deepest first; only while still empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise
