"""The archive side of the safe loader: a ``torch.save`` zip archive's entries checked against the
file before anything is read, its storages read (or only sized) for the interpreter, and tensors cut
from them; :func:`load_checkpoint` and :func:`check_checkpoint` put the pieces together."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert_weights.safe_pickle.allowed import BASE_ALLOWED, TensorInfo, _Storage, _StorageType
from convert_weights.safe_pickle.interpreter import _check_result, _Machine
from convert_weights.safe_pickle.limits import (
    _CHUNK,
    _SMALL_ENTRY,
    MAX_COMPRESSION_RATIO,
    MAX_PICKLE_BYTES,
    MAX_ZIP_ENTRIES,
    TENSOR_COPY_SLACK,
    CheckpointError,
    UnsafeCheckpointError,
    _clip,
    _Malformed,
    _short,
    _Unsafe,
)


class _Load:
    """One load of one archive: entry checks, storage cache and allocation budgets."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, file_size: int, read_data: bool):
        self.path = path
        self.archive = archive
        self.file_size = file_size
        self.read_data = read_data
        self.storages: dict[str, _Storage] = {}
        self.stored_bytes = 0
        self.inflated_bytes = 0
        self.storage_bytes = 0
        self.copied_bytes = 0
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise CheckpointError(f"{path}: the archive has {len(infos)} entries (at most {MAX_ZIP_ENTRIES})")
        self.entries: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in self.entries:
                raise CheckpointError(f"{path}: the archive holds two entries named {_short(info.filename)}")
            self.entries[info.filename] = info
        pickles = [n for n in self.entries if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected exactly one data.pkl in the archive, found {len(pickles)}")
        self.pickle_name = pickles[0]
        self.root = self.pickle_name[: -len("data.pkl")]
        self.byteorder = "little"
        order_name = f"{self.root}byteorder"
        if order_name in self.entries:
            raw = self.read_entry(self.entries[order_name], limit=_SMALL_ENTRY)
            try:
                self.byteorder = raw.decode("ascii").strip()
            except UnicodeDecodeError:
                raise CheckpointError(f"{path}: {_clip(order_name)} is not ASCII text ({_short(bytes(raw))})") from None
            if self.byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: {_clip(order_name)} says {_short(self.byteorder)}, not 'little' or 'big'")

    def check_entry(self, info: zipfile.ZipInfo, limit: int | None = None) -> None:
        """Refuse an entry whose declared sizes the file cannot back, before reading anything."""
        name, size = _clip(info.filename), info.file_size
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{self.path}: archive entry {name} is encrypted")
        if limit is not None and size > limit:
            raise CheckpointError(f"{self.path}: archive entry {name} declares {size} bytes (at most {limit})")
        if info.header_offset < 0 or info.header_offset + 30 + info.compress_size > self.file_size:
            raise CheckpointError(f"{self.path}: archive entry {name} extends past the end of the file (truncated archive?)")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != size:
                raise CheckpointError(
                    f"{self.path}: stored archive entry {name} declares {size} bytes but occupies {info.compress_size}"
                )
            if self.stored_bytes + size > self.file_size:
                raise CheckpointError(
                    f"{self.path}: archive entries read so far declare more bytes than the file holds "
                    f"(overlapping entries at {name})"
                )
            self.stored_bytes += size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if size > MAX_COMPRESSION_RATIO * info.compress_size + 1024:
                raise CheckpointError(
                    f"{self.path}: archive entry {name} declares {size} bytes from {info.compress_size} compressed "
                    f"(more than {MAX_COMPRESSION_RATIO}:1; zip bomb?)"
                )
            if self.inflated_bytes + size > MAX_COMPRESSION_RATIO * self.file_size + (1 << 20):
                raise CheckpointError(
                    f"{self.path}: compressed archive entries expand to more than {MAX_COMPRESSION_RATIO} times "
                    f"the file's size (at {name}; zip bomb?)"
                )
            self.inflated_bytes += size
        else:
            raise CheckpointError(
                f"{self.path}: archive entry {name} uses compression method {info.compress_type} "
                "(only stored and deflate entries are read)"
            )

    def read_entry(self, info: zipfile.ZipInfo, limit: int | None = None) -> bytearray:
        """The entry's bytes: exactly its declared size (checked first), read in chunks, CRC checked."""
        self.check_entry(info, limit)
        size, name = info.file_size, _clip(info.filename)
        buf = bytearray(size)
        view = memoryview(buf)
        pos = 0
        try:
            with self.archive.open(info) as stream:
                while pos < size:
                    chunk = stream.read(min(_CHUNK, size - pos))
                    if not chunk:
                        raise CheckpointError(f"{self.path}: archive entry {name} is truncated ({pos} of {size} bytes)")
                    view[pos:pos + len(chunk)] = chunk
                    pos += len(chunk)
                if stream.read(1):
                    raise CheckpointError(f"{self.path}: archive entry {name} holds more than its declared {size} bytes")
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - zipfile/zlib on corrupt data: BadZipFile, zlib.error, EOFError, ...
            raise CheckpointError(
                f"{self.path}: cannot read archive entry {name}: {type(exc).__name__}: {_clip(str(exc), 200)}"
            ) from None
        finally:
            view.release()
        return buf

    def persistent_load(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise _Unsafe(f"unsupported persistent id {_short(pid)}")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Unsafe(f"unsupported storage type {_short(storage_type)}")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise _Malformed(f"malformed storage reference {_short(pid)}")
        dtype = storage_type.dtype
        cached = self.storages.get(key)
        if cached is not None:
            if cached.dtype != dtype or cached.numel != numel:
                raise _Malformed(f"storage '{_clip(key)}' is declared twice, with different types or sizes")
            return cached
        member = f"{self.root}data/{key}"
        info = self.entries.get(member)
        if info is None:
            raise _Malformed(f"storage '{_clip(key)}' named by the pickle is not in the archive (no entry {_clip(member)})")
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            raise _Malformed(
                f"storage '{_clip(key)}' declares {_short(numel)} {storage_type.name} elements ({_short(nbytes)} bytes) but its "
                f"archive entry holds {info.file_size} bytes"
            )
        array = None
        if self.read_data:
            array = self._elements(self.read_entry(info), dtype)
        else:
            self.check_entry(info)
        self.storage_bytes += nbytes
        storage = self.storages[key] = _Storage(key, dtype, numel, array, self)
        return storage

    def _elements(self, raw: bytearray, dtype: np.dtype) -> np.ndarray:
        if dtype == np.bool_:
            flat = np.frombuffer(raw, np.uint8)
            np.minimum(flat, 1, out=flat)  # any non-zero byte is True
        elif dtype.itemsize > 1 and self.byteorder != sys.byteorder:
            np.frombuffer(raw, f"u{dtype.itemsize}").byteswap(inplace=True)
        array = np.frombuffer(raw, dtype)
        array.flags.writeable = False
        return array

    def view(self, storage: _Storage, offset: int, shape: tuple, strides: tuple, numel: int):
        """The tensor (a view of the storage, or a copy if non-contiguous); TensorInfo when not reading."""
        flat, itemsize = storage.array, storage.dtype.itemsize
        if numel == 0:
            return TensorInfo(shape, storage.dtype) if flat is None else np.zeros(shape, storage.dtype)
        expected, contiguous = 1, True
        for n, s in zip(reversed(shape), reversed(strides)):
            if n != 1 and s != expected:
                contiguous = False
                break
            expected *= n
        if not contiguous:
            self.copied_bytes += numel * itemsize
            if self.copied_bytes > 2 * self.storage_bytes + TENSOR_COPY_SLACK:
                raise _Malformed("non-contiguous tensors copy more than twice the storage bytes")
        if flat is None:
            return TensorInfo(shape, storage.dtype)
        if contiguous:
            return flat[offset:offset + numel].reshape(shape)
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=shape, strides=tuple(s * itemsize for s in strides), writeable=False
        )
        return np.ascontiguousarray(view)


def _load(path: str | Path, extra_allowed: Mapping[tuple[str, str], Any] | None, read_data: bool) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    allowed = dict(BASE_ALLOWED)
    if extra_allowed:
        allowed.update(extra_allowed)
    try:
        file_size = path.stat().st_size
        archive = zipfile.ZipFile(path)
    except Exception as exc:  # noqa: BLE001 - zipfile on a corrupt directory raises many types
        raise CheckpointError(
            f"{path}: not a PyTorch zip archive (legacy or corrupt checkpoint format): "
            f"{type(exc).__name__}: {_clip(str(exc), 200)}"
        ) from None
    with archive:
        load = _Load(path, archive, file_size, read_data)
        data = bytes(load.read_entry(load.entries[load.pickle_name], limit=MAX_PICKLE_BYTES))
        machine = _Machine(data, allowed, load)
        try:
            result = machine.run()
            _check_result(result)
            return result
        except CheckpointError as exc:
            message = str(exc)
            if not message.startswith(str(path)):
                message = f"{path}: {message}"
            raise type(exc)(message) from None
        except _Unsafe as exc:
            raise UnsafeCheckpointError(f"{path}: {exc}") from None
        except (_Malformed, Exception) as exc:  # noqa: BLE001 - any other failure is a malformed pickle
            detail = str(exc) if isinstance(exc, _Malformed) else f"{type(exc).__name__}: {_clip(str(exc), 200)}"
            raise CheckpointError(
                f"{path}: malformed checkpoint pickle ({_clip(load.pickle_name)} byte {max(machine.pos - 1, 0)}): {detail}"
            ) from None
        finally:
            machine.stack = machine.metastack = machine.keep = []
            machine.memo = {}


def load_checkpoint(path: str | Path, extra_allowed: Mapping[tuple[str, str], Any] | None = None) -> Any:
    """Load a ``torch.save`` zip archive safely; tensors become numpy arrays.

    ``extra_allowed`` adds the globals a particular layout needs (for example the
    omegaconf classes of the diffusion checkpoint), each mapped to a stand-in.
    Every failure raises :class:`CheckpointError` (:class:`UnsafeCheckpointError` for a
    global outside the allow-list).
    """
    return _load(path, extra_allowed, read_data=True)


def check_checkpoint(path: str | Path, extra_allowed: Mapping[tuple[str, str], Any] | None = None) -> Any:
    """Everything :func:`load_checkpoint` checks except the storage bytes themselves, which are
    never read (their entries' sizes are checked): cheap enough to vet every file of a model
    directory before converting any. Tensors come back as :class:`TensorInfo`."""
    return _load(path, extra_allowed, read_data=False)
