"""Write PyTorch ``torch.save`` zip archives without torch.

The counterpart of :mod:`convert_weights.safe_pickle`: it produces the archive layout
``torch.save`` writes (``<root>/data.pkl``, one raw little-endian byte file per tensor
storage under ``<root>/data/<key>``, ``<root>/byteorder``, ``<root>/version``), with the
pickle opcodes emitted here directly (protocol 2, as torch uses by default):

* numpy arrays become tensors: ``torch._utils._rebuild_tensor_v2`` called with a
  persistent-id storage ``('storage', torch.<Type>Storage, key, 'cpu', numel)``, offset 0,
  the shape and contiguous strides. The same array object saved twice shares one storage,
  as tied parameters do in a real state dict;
* ``dict``/``OrderedDict``/``list``/``tuple``/``str``/``bytes``/``int``/``float``/``bool``/
  ``None`` are written as the standard pickler would;
* :class:`Global`, :class:`NewObj` and :class:`Reduce` describe arbitrary module-level
  objects (for instance the omegaconf ``DictConfig`` nodes of a diffusion checkpoint)
  without importing them: ``NewObj(Global("omegaconf.nodes", "AnyNode"), state={...})``
  pickles as ``cls.__new__(cls)`` followed by ``__setstate__``/``__dict__`` update.

Files are written to a temporary sibling and moved into place, so an interrupted write
never leaves a truncated checkpoint behind. Output is byte-for-byte deterministic.
"""

from __future__ import annotations

import collections
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convert_weights.safe_pickle import STORAGE_DTYPES

__all__ = ["Global", "NewObj", "Reduce", "omegaconf_config", "save_checkpoint", "dumps_checkpoint_pickle", "TorchWriterError"]

from mvjax.core.atomic import atomic_path
from mvjax.core.errors import MvjaxError


class TorchWriterError(MvjaxError, TypeError):
    """An object the writer does not know how to store."""


@dataclass(frozen=True)
class Global:
    """A module-level name (class, function or constant), pickled as ``GLOBAL module name``."""

    module: str
    name: str


@dataclass(eq=False)
class NewObj:
    """``cls.__new__(cls, *args)`` (opcode NEWOBJ), then ``BUILD`` with ``state`` unless it is None."""

    cls: Global
    args: tuple = ()
    state: Any = None


@dataclass(eq=False)
class Reduce:
    """``func(*args)`` (opcode REDUCE), then ``BUILD`` with ``state`` unless it is None."""

    func: Global
    args: tuple = ()
    state: Any = None
    # Extra (key, value) pairs added with SETITEMS after construction (dict subclasses).
    items: list = field(default_factory=list)


# numpy dtype -> torch storage class name.
_STORAGE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in STORAGE_DTYPES.items()}

# Protocol 2 spells the ``builtins`` module as Python 2's ``__builtin__``.
_PROTO2_MODULES = {"builtins": "__builtin__"}

_ALIGNMENT = 64  # storages start at multiples of this offset in the archive, as torch writes them
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

# Pickle opcodes (protocol <= 2).
_PROTO, _STOP = b"\x80", b"."
_MARK, _TUPLE, _EMPTY_TUPLE, _TUPLE1, _TUPLE2, _TUPLE3 = b"(", b"t", b")", b"\x85", b"\x86", b"\x87"
_EMPTY_DICT, _SETITEMS, _EMPTY_LIST, _APPENDS = b"}", b"u", b"]", b"e"
_NONE, _NEWTRUE, _NEWFALSE = b"N", b"\x88", b"\x89"
_BININT, _BININT1, _BININT2, _LONG1, _BINFLOAT = b"J", b"K", b"M", b"\x8a", b"G"
_BINUNICODE, _GLOBAL, _REDUCE, _BUILD, _NEWOBJ, _BINPERSID = b"X", b"c", b"R", b"b", b"\x81", b"Q"
_BINPUT, _LONG_BINPUT, _BINGET, _LONG_BINGET = b"q", b"r", b"h", b"j"

_BATCH = 1000  # items per SETITEMS / APPENDS, as the standard pickler batches them


class _Pickler:
    """Emits protocol-2 opcodes for the supported object kinds; collects tensor storages."""

    def __init__(self):
        self.out = bytearray()
        self.memo: dict[int, int] = {}
        self.keep: list = []  # keeps memoised objects alive so their ids stay unique
        self.storages: dict[int, tuple[str, np.ndarray]] = {}  # id(array) -> (key, contiguous little-endian data)
        self.in_progress: set[int] = set()

    # --- memo ------------------------------------------------------------------------
    def _put(self, obj) -> None:
        index = len(self.memo)
        self.memo[id(obj)] = index
        self.keep.append(obj)
        self.out += _BINPUT + bytes([index]) if index < 256 else _LONG_BINPUT + struct.pack("<I", index)

    def _get(self, obj) -> bool:
        index = self.memo.get(id(obj))
        if index is None:
            return False
        self.out += _BINGET + bytes([index]) if index < 256 else _LONG_BINGET + struct.pack("<I", index)
        return True

    # --- scalars ---------------------------------------------------------------------
    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += _BININT1 + bytes([value])
        elif 0 <= value < 65536:
            self.out += _BININT2 + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += _BININT + struct.pack("<i", value)
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            if len(raw) > 255:
                raise TorchWriterError(f"integer too large to store: {value}")
            self.out += _LONG1 + bytes([len(raw)]) + raw

    def _str(self, value: str) -> None:
        raw = value.encode("utf-8", "surrogatepass")
        self.out += _BINUNICODE + struct.pack("<I", len(raw)) + raw

    def _global(self, g: Global) -> None:
        module = _PROTO2_MODULES.get(g.module, g.module)
        if "\n" in module or "\n" in g.name:
            raise TorchWriterError(f"invalid global name {g.module}.{g.name}")
        self.out += _GLOBAL + f"{module}\n{g.name}\n".encode("utf-8")

    def _tuple_items(self, items) -> None:
        if len(items) == 0:
            self.out += _EMPTY_TUPLE
            return
        if len(items) <= 3:
            for item in items:
                self.save(item)
            self.out += (_TUPLE1, _TUPLE2, _TUPLE3)[len(items) - 1]
            return
        self.out += _MARK
        for item in items:
            self.save(item)
        self.out += _TUPLE

    def _setitems(self, items) -> None:
        items = list(items)
        for start in range(0, len(items), _BATCH):
            self.out += _MARK
            for key, value in items[start : start + _BATCH]:
                self.save(key)
                self.save(value)
            self.out += _SETITEMS

    # --- objects ---------------------------------------------------------------------
    def save(self, obj: Any) -> None:
        if obj is None:
            self.out += _NONE
        elif obj is True or obj is False or isinstance(obj, np.bool_):
            self.out += _NEWTRUE if bool(obj) else _NEWFALSE
        elif isinstance(obj, (int, np.integer)):
            self._int(int(obj))
        elif isinstance(obj, (float, np.floating)):
            self.out += _BINFLOAT + struct.pack(">d", float(obj))
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, (bytes, bytearray)):
            # Protocol 2 has no bytes opcode: the standard pickler writes _codecs.encode(latin-1 text, "latin1").
            self._global(Global("_codecs", "encode"))
            self._tuple_items((bytes(obj).decode("latin-1"), "latin1"))
            self.out += _REDUCE
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        elif isinstance(obj, Global):
            self._global(obj)
        elif self._get(obj):
            pass
        elif isinstance(obj, collections.OrderedDict):
            self._global(Global("collections", "OrderedDict"))
            self.out += _EMPTY_TUPLE + _REDUCE
            self._put(obj)
            self._setitems(obj.items())
        elif isinstance(obj, dict):
            self.out += _EMPTY_DICT
            self._put(obj)
            self._setitems(obj.items())
        elif isinstance(obj, list):
            self.out += _EMPTY_LIST
            self._put(obj)
            for start in range(0, len(obj), _BATCH):
                self.out += _MARK
                for item in obj[start : start + _BATCH]:
                    self.save(item)
                self.out += _APPENDS
        elif isinstance(obj, tuple):
            if id(obj) in self.in_progress:
                raise TorchWriterError("a tuple that contains itself cannot be stored")
            self.in_progress.add(id(obj))
            self._tuple_items(obj)
            self.in_progress.discard(id(obj))
            self._put(obj)
        elif isinstance(obj, NewObj):
            self._global(obj.cls)
            self._tuple_items(tuple(obj.args))
            self.out += _NEWOBJ
            self._put(obj)
            if obj.state is not None:
                self.save(obj.state)
                self.out += _BUILD
        elif isinstance(obj, Reduce):
            self._global(obj.func)
            self._tuple_items(tuple(obj.args))
            self.out += _REDUCE
            self._put(obj)
            if obj.items:
                self._setitems(obj.items)
            if obj.state is not None:
                self.save(obj.state)
                self.out += _BUILD
        else:
            raise TorchWriterError(f"cannot store an object of type {type(obj).__name__} in a torch checkpoint")

    def _tensor(self, arr: np.ndarray) -> None:
        dtype = np.dtype(arr.dtype)
        native = dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype
        name = _STORAGE_NAMES.get(native)
        if name is None:
            raise TorchWriterError(f"no torch storage type for numpy dtype {dtype}")
        entry = self.storages.get(id(arr))
        if entry is None:
            data = np.ascontiguousarray(arr).astype(native.newbyteorder("<"), copy=False)
            entry = (str(len(self.storages)), data)
            self.storages[id(arr)] = entry
            self.keep.append(arr)
        key, data = entry
        shape = tuple(int(n) for n in arr.shape)
        strides, step = [], 1
        for n in reversed(shape):
            strides.append(step)
            step *= max(n, 1)
        strides = tuple(reversed(strides))

        self._global(Global("torch._utils", "_rebuild_tensor_v2"))
        self.out += _MARK
        # storage: persistent id ('storage', storage type, key, location, numel)
        self._tuple_items(("storage", Global("torch", name), key, "cpu", int(data.size)))
        self.out += _BINPERSID
        self._int(0)  # storage offset
        self._tuple_items(shape)
        self._tuple_items(strides)
        self.out += _NEWFALSE  # requires_grad
        self._global(Global("collections", "OrderedDict"))  # backward hooks: OrderedDict()
        self.out += _EMPTY_TUPLE + _REDUCE
        self.out += _TUPLE + _REDUCE


_ANY = Global("typing", "Any")


def _resolver_cache() -> Reduce:
    return Reduce(Global("collections", "defaultdict"), (Global("builtins", "dict"),))


def _container_metadata(key, object_type: Global, key_type: Global) -> NewObj:
    return NewObj(Global("omegaconf.base", "ContainerMetadata"), state={
        "ref_type": _ANY, "object_type": object_type, "optional": True, "key": key, "flags": {},
        "flags_root": False, "resolver_cache": _resolver_cache(), "key_type": key_type, "element_type": _ANY,
    })


def omegaconf_config(value: Any, key: Any = None, parent: Any = None) -> Any:
    """Plain dicts/lists/scalars -> the node graph an untyped omegaconf ``DictConfig`` pickles as.

    Mappings become ``DictConfig`` nodes, lists/tuples ``ListConfig`` nodes and every
    scalar an ``AnyNode`` (what ``OmegaConf.create`` makes of untyped values); each node
    carries its metadata (key, flags, resolver cache) and a reference to its parent, as
    omegaconf's own ``__getstate__`` records them. ``safe_pickle.plain_config`` reads it back.
    """
    if isinstance(value, dict):
        node = NewObj(Global("omegaconf.dictconfig", "DictConfig"))
        content: dict = {}
        node.state = {"_metadata": _container_metadata(key, Global("builtins", "dict"), _ANY),
                      "_parent": parent, "_content": content}
        for k, v in value.items():
            content[k] = omegaconf_config(v, k, node)
        return node
    if isinstance(value, (list, tuple)):
        node = NewObj(Global("omegaconf.listconfig", "ListConfig"))
        items: list = []
        node.state = {"_metadata": _container_metadata(key, Global("builtins", "list"), Global("builtins", "int")),
                      "_parent": parent, "_content": items}
        for i, v in enumerate(value):
            items.append(omegaconf_config(v, i, node))
        return node
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise TorchWriterError(f"omegaconf values must be None, bool, int, float or str, got {type(value).__name__}")
    metadata = NewObj(Global("omegaconf.base", "Metadata"), state={
        "ref_type": _ANY, "object_type": None, "optional": True, "key": key, "flags": {},
        "flags_root": False, "resolver_cache": _resolver_cache(),
    })
    return NewObj(Global("omegaconf.nodes", "AnyNode"), state={"_metadata": metadata, "_parent": parent, "_val": value})


def dumps_checkpoint_pickle(obj: Any) -> tuple[bytes, list[tuple[str, np.ndarray]]]:
    """(the ``data.pkl`` bytes, [(storage key, contiguous little-endian array), ...])."""
    pickler = _Pickler()
    pickler.out += _PROTO + b"\x02"
    pickler.save(obj)
    pickler.out += _STOP
    return bytes(pickler.out), [entry for entry in pickler.storages.values()]


def _archive_root(path: Path) -> str:
    root = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name.split(".")[0] or "archive")
    return root or "archive"


def _write_member(zf: zipfile.ZipFile, fh, name: str, payload, align: bool) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    if align:
        # Pad the local header with an extra field so the member's bytes start on an aligned offset.
        header = 30 + len(name.encode("utf-8")) + 4
        pad = (-(fh.tell() + header)) % _ALIGNMENT
        info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    zf.writestr(info, payload)


def save_checkpoint(path: str | os.PathLike, obj: Any, root: str | None = None) -> Path:
    """Write ``obj`` to ``path`` as ``torch.save`` would (zip archive, pickle protocol 2).

    ``obj`` may nest dicts, ``collections.OrderedDict``, lists, tuples, strings, bytes,
    ints, floats, bools, None, numpy arrays (float32/float64/float16/bfloat16, int64/
    int32/int16/int8/uint8, bool) and :class:`Global` / :class:`NewObj` / :class:`Reduce`
    nodes. ``root`` names the archive's top folder (default: the file name up to its
    first dot, as torch does). The file appears atomically.
    """
    path = Path(path)
    root = root or _archive_root(path)
    payload, storages = dumps_checkpoint_pickle(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_member(zf, fh, f"{root}/data.pkl", payload, align=True)
            _write_member(zf, fh, f"{root}/.format_version", b"1", align=False)
            _write_member(zf, fh, f"{root}/.storage_alignment", str(_ALIGNMENT).encode(), align=False)
            _write_member(zf, fh, f"{root}/byteorder", b"little", align=False)
            for key, data in storages:
                _write_member(zf, fh, f"{root}/data/{key}", data.view(np.uint8).reshape(-1).data if data.size else b"",
                              align=True)
            _write_member(zf, fh, f"{root}/version", b"3\n", align=False)
    return path
