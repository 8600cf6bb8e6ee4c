"""A prepared split read in place, for training: rows memory-mapped from the .npz, read and checked on demand.

:func:`open_split` reads the manifest and every member's zip and .npy headers, checks them (the
members, their sizes, shapes, dtypes, C order, stored uncompressed) and maps ``tokens``, ``spk`` and
``frames`` where they lie in the file (``np.savez`` stores members uncompressed, so each ``.npy``
is a contiguous run of bytes after its zip local header). Nothing else is read until a step asks
for rows, and then only those rows: under ``jax.distributed`` each process reads only the rows its
own devices take (:meth:`mvjax.train.trainer.Trainer.step_rows`). The format is documented in
:mod:`mvjax.train.data`.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from mvjax.train.data import ARRAYS, NPY_HEADER_BYTES, DataError, checked_layout

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip member's local file header (30 bytes, then name and extra)
_LOCAL_SIGNATURE = 0x04034B50


def _npy_in_place(path: Path, fh, info: zipfile.ZipInfo) -> tuple[int, tuple, bool, np.dtype]:
    """(file offset of the array's data, shape, fortran order, dtype) of a stored ``.npy`` member, from its
    zip local header and its .npy header alone. A compressed or encrypted member has no such offset."""
    name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise DataError(f"{path}: {name} is compressed; training reads the arrays in place, so the split must be "
                        "written uncompressed (np.savez, as python -m mvjax.finetune prepare does)")
    fh.seek(info.header_offset)
    head = fh.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(head)[0] != _LOCAL_SIGNATURE:
        raise DataError(f"{path}: damaged (no local header for {name})")
    name_len, extra_len = _LOCAL_HEADER.unpack(head)[-2:]
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    fh.seek(start)
    header = io.BytesIO(fh.read(min(info.file_size, NPY_HEADER_BYTES)))
    try:
        version = np.lib.format.read_magic(header)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
        else:
            raise ValueError(f".npy version {version[0]}.{version[1]} is not read in place")
    except (ValueError, EOFError) as exc:
        raise DataError(f"{path}: damaged {name} header ({str(exc).splitlines()[0] if str(exc) else 'unreadable'})"
                        ) from None
    data = start + header.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if header.tell() + size != info.file_size or data + size > os.fstat(fh.fileno()).st_size:
        raise DataError(f"{path}: damaged ({name} holds {info.file_size - header.tell()} data bytes, its header says "
                        f"{size})")
    return data, tuple(shape), bool(fortran), dtype


def _mapped(path: Path, offset: int, shape: tuple, dtype) -> np.ndarray:
    """A read-only view of ``shape`` at ``offset`` of the file; pages are read only when rows are indexed."""
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype)  # mmap refuses an empty map
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class SplitReader:
    """One split, its arrays mapped in place: :meth:`tokens_rows` / :meth:`spk_rows` read and check only the
    rows asked for.

    The values are checked on the rows read (at fetch time), not in a pass over the file at open: which rows a
    process reads changes every step (a fresh shuffle per epoch, split over the devices of every process), so
    no process owns a fixed share that it could check up front, and a pass over the whole file is the work a
    process of a large job must not do. A bad row therefore stops training at the step that first reads it,
    with one line that names it (checkpoints written before it stay usable once the row is fixed). The check
    costs a comparison per value read, nothing beside the step.
    """

    def __init__(self, name: str, path: Path, manifest: dict, tokens: np.ndarray, spk: np.ndarray,
                 frames: np.ndarray):
        self.name, self.path, self.manifest = name, path, manifest
        self.tokens, self.spk, self.frames = tokens, spk, frames  # mapped: index them through the methods below

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def ctx_window(self) -> int:
        return int(self.manifest["ctx_window"])

    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise DataError(f"{self.path}: row ids outside [0, {len(self)})")
        return ids

    def _refuse(self, ids: np.ndarray, bad: np.ndarray, what: str) -> None:
        if bad.any():
            raise DataError(f"{self.path}: row {int(ids[int(np.argmax(bad))])}: {what}")

    def tokens_rows(self, ids) -> np.ndarray:
        """Rows ``ids`` of ``tokens``, (len(ids), 1, ctx_window + 1) int32; their token ids and frame counts
        checked (DataError naming the first bad row)."""
        ids = self._ids(ids)
        rows = np.array(self.tokens[ids], np.int32)
        self._refuse(ids, (rows < 0).reshape(len(ids), -1).any(axis=1), "negative token ids")
        self._refuse(ids, np.asarray(self.frames[ids]) < 1, "no audio frames")
        return rows

    def spk_rows(self, ids) -> np.ndarray:
        """Rows ``ids`` of ``spk``, (len(ids), S) float32, checked finite (DataError naming the first bad row)."""
        ids = self._ids(ids)
        rows = np.array(self.spk[ids], np.float32)
        self._refuse(ids, ~np.isfinite(rows).all(axis=1), "non-finite speaker embedding")
        return rows


def open_split(data_dir: str | os.PathLike, split: str = "train") -> SplitReader:
    """Open split ``split`` for training: the manifest and every member's zip and .npy headers are read and
    checked (members, sizes, shapes, dtypes, C order, stored uncompressed); ``tokens``, ``spk`` and ``frames`` are
    mapped where they lie, ``texts`` and ``audio`` (not needed to train) are never read. No row is read here."""
    manifest, path, expected = checked_layout(data_dir, split)
    rows = manifest["splits"][split]["rows"]
    arrays = {}
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            infos = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i for i in zf.infolist()}
            for name in ARRAYS:
                offset, shape, fortran, dtype = _npy_in_place(path, fh, infos[name])
                if name in expected:
                    want_shape, want_dtype = expected[name]
                    if shape != want_shape or dtype != want_dtype:
                        raise DataError(f"{path}: {name} is {dtype}{list(shape)}, expected "
                                        f"{want_dtype}{list(want_shape)}")
                    if fortran:
                        raise DataError(f"{path}: {name} is stored in Fortran order; training reads C-order rows")
                    arrays[name] = (offset, shape, dtype)
                elif shape != (rows,) or dtype.kind != "U":
                    raise DataError(f"{path}: {name} must be ({rows},) str, got {dtype}{list(shape)}")
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    mapped = {name: _mapped(path, *where) for name, where in arrays.items()}
    return SplitReader(split, path, manifest, mapped["tokens"], mapped["spk"], mapped["frames"])
