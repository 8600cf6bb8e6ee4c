"""Scratch directories that a killed process leaves behind, removed by the next process.

A process stopped by SIGKILL (``kill -9``, the kernel's out-of-memory killer, a container
runtime's hard stop) cannot remove its temporary files, and the system's temp directory is
shared: a server cleaning it cannot simply delete everything under its own prefix, because
another server may be using the same directory at the same moment. So every scratch directory
made here carries its owner in its name, ``<prefix><pid>.<start>-<random>``, ``start`` being the
owner's start time (clock ticks since boot, from ``/proc``; ``0`` where the system has no
``/proc``). :func:`sweep_orphans` removes only directories whose owner is gone: no process with
that pid, or a process with that pid that started at another time (the pid was reused, as a
container's pid 1 is after every restart). A directory of a live owner, this process included,
is never touched.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

UNKNOWN_START = "0"
# Entries of the temp directory looked at per sweep, and directories removed: a bounded pass
# even over a temp directory with millions of files.
SCAN_LIMIT = 100_000
REMOVE_LIMIT = 1_000


def process_start(pid: int) -> str:
    """``pid``'s start time in clock ticks since boot, or ``UNKNOWN_START``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read(4096)
        # Fields after the parenthesised command name (which may hold spaces): state is field 3,
        # the start time field 22.
        start = stat[stat.rindex(b")") + 2:].split()[19].decode("ascii")
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return UNKNOWN_START
    return start if start.isdigit() else UNKNOWN_START


def owner_token(pid: Optional[int] = None) -> str:
    """``<pid>.<start>``: names a process for as long as it lives, and no other one after it."""
    pid = os.getpid() if pid is None else int(pid)
    return f"{pid}.{process_start(pid)}"


def make_owned_dir(prefix: str, directory: Optional[Path] = None) -> str:
    """A new private directory (``tempfile.mkdtemp``, mode 0700) whose name carries this process's
    :func:`owner_token`, under ``directory`` (the system's temp directory by default)."""
    return tempfile.mkdtemp(prefix=f"{prefix}{owner_token()}-", dir=directory)


def owner_alive(pid: int, start: str) -> bool:
    """Whether the process that made a directory stamped ``<pid>.<start>`` still runs. When in
    doubt (no permission to ask, start time unknown on either side) it counts as alive."""
    if os.name == "nt":  # os.kill there terminates the process instead of asking about it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a live process of another user
    except (OSError, OverflowError, ValueError):
        return True
    now = process_start(pid)
    return UNKNOWN_START in (now, start) or now == start


def sweep_orphans(prefix: str, directory: Optional[Path] = None) -> int:
    """Remove the scratch directories under ``directory`` made by :func:`make_owned_dir` with
    ``prefix`` whose owner is gone, with the files directly in them; returns how many. Only
    directories of this user are touched, links are never followed, a directory holding
    anything but plain files (which :func:`make_owned_dir`'s users never make) is left alone, and
    no error stops the start-up that calls it: what cannot be removed is logged and skipped."""
    root = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"(\d{1,10})\.(\d{1,20})-[A-Za-z0-9_]{1,32}")
    uid = os.getuid() if hasattr(os, "getuid") else None
    removed = 0
    try:
        entries = os.scandir(root)
    except OSError as exc:
        log.warning("cannot look for leftover scratch directories in the temp directory: %s", exc.strerror)
        return 0
    with entries:
        for seen, entry in enumerate(entries):
            if seen >= SCAN_LIMIT or removed >= REMOVE_LIMIT:
                break
            match = pattern.fullmatch(entry.name)
            if match is None:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if not entry.is_dir(follow_symlinks=False) or (uid is not None and info.st_uid != uid):
                    continue
                if owner_alive(int(match.group(1)), match.group(2)):
                    continue
                if _remove_flat_dir(Path(entry.path)):
                    removed += 1
            except OSError as exc:
                log.warning("could not remove a leftover scratch directory %s: %s", entry.name, exc.strerror)
    if removed:
        log.info("removed %d scratch director%s left by stopped processes", removed, "y" if removed == 1 else "ies")
    return removed


def _remove_flat_dir(path: Path) -> bool:
    with os.scandir(path) as children:
        kids = list(children)
    if any(kid.is_dir(follow_symlinks=False) for kid in kids):
        log.warning("leaving the scratch directory %s: it holds a directory", path.name)
        return False
    for kid in kids:
        try:
            os.unlink(kid.path)
        except FileNotFoundError:  # another process sweeping at the same time
            pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return False
    return True
