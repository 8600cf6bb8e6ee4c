"""Content digests (SHA-256, hex) of files and JSON values: what the caches and the dataset job key by."""

from __future__ import annotations

import hashlib
import json
import os


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read 1 MiB at a time (a file of any size in bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_sha256(value) -> str:
    """The SHA-256 of ``value`` as canonical JSON (sorted keys, no spaces): equal values, equal digests."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
