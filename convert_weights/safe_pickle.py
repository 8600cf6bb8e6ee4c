"""Read PyTorch ``torch.save`` zip archives without executing code and without torch.

A ``.pt`` file is a zip archive holding ``<root>/data.pkl`` (a pickle) and one raw
byte file per tensor storage under ``<root>/data/<key>`` (plus ``<root>/byteorder``).
Full unpickling would run whatever callables the pickle names, so this module does not
use :mod:`pickle` at all: a small opcode interpreter written here executes the pickle,
and only the globals listed in an explicit allow-list resolve, each to a stand-in that
builds numpy arrays or plain Python containers. Any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen``...) makes the load fail with
:class:`UnsafeCheckpointError` naming it, before anything runs.

Long because it is a complete, bounded pickle interpreter plus the zip and tensor checks that
sit between an untrusted file and any allocation; split up, every limit would have to be
re-checked at each seam. Its sections: archive, opcodes, allow-listed stand-ins, tensors.

Tensors come back as C-contiguous ``numpy.ndarray`` (bfloat16 through ``ml_dtypes``, imported on first use):
read-only views of their storage when the saved layout is contiguous, copies otherwise.

Every failure is a :class:`CheckpointError` whose message is one line naming the file and
the problem. No input makes :func:`load_checkpoint` raise another exception type, crash,
run for long, allocate much more than the archive holds, or change any state that
outlives the call (the allow-list's stand-ins cannot be modified by a pickle).

Limits (each refusal names the limit it hit)
-------------------------------------------
Archive, checked from the zip directory before anything is read:

* at most :data:`MAX_ZIP_ENTRIES` entries, no duplicate names, exactly one ``data.pkl``;
* only stored or deflate entries, not encrypted, lying inside the file; a stored entry's
  declared size equals the bytes it occupies; a deflate entry may expand at most
  :data:`MAX_COMPRESSION_RATIO`-fold; entries are read in chunks and never past their
  declared size, and their CRC is checked;
* all entries read together: stored bytes at most the file's size (overlapping entries
  cannot multiply it), inflated bytes at most :data:`MAX_COMPRESSION_RATIO` times it;
* ``data.pkl`` at most :data:`MAX_PICKLE_BYTES`; ``byteorder`` says ``little`` or ``big``.

Pickle (protocols 2 to 5, the binary opcodes that build data; no ``INST``/``OBJ``/``EXT``,
no protocol-0 text opcodes, no out-of-band buffers):

* every length (strings, bytes, integers, frames) is checked against the bytes left before
  anything is allocated; integers at most :data:`MAX_INT_BYTES` bytes;
* at most :data:`MAX_PICKLE_OPS` opcodes (which bounds the stack, the memo and every
  container); tuples nest at most :data:`MAX_NESTING` deep as they are built;
* at most :data:`MAX_COMPOSITE_KEYS` dict keys / set items whose hashes a file could make
  collide (tuples, frozensets, integers of 2**61 - 1 or more), so inserting keys stays linear;
  ``OrderedDict``/``dict`` stand-ins take no constructor arguments (items come by ``SETITEMS``);
* calls to allow-listed globals create at most :data:`MAX_CALL_BYTES` bytes in total;
* ``REDUCE``/``NEWOBJ`` only call allow-listed globals; ``BUILD`` (``__setstate__``) only
  applies to stand-in objects this load created, and ``APPEND``/``SETITEM``/``ADDITEMS``
  only to containers: a pickle can never change a global, so no load affects another;
* the result holds only dicts, lists, tuples, sets, str, bytes, int, float, bool, None,
  arrays and config stand-ins, nests at most :data:`MAX_NESTING` deep, has no cycles, and
  has at most :data:`MAX_OBJECT_VISITS` nodes when shared references are expanded.

Tensors (``torch._utils._rebuild_tensor_v2``) and storages (persistent id
``('storage', torch.<Type>Storage, key, location, numel)``):

* the key names an archive entry of exactly ``numel * itemsize`` bytes (checked before it
  is read); one key is used with one storage type only;
* storage offset >= 0, sizes >= 0, strides >= 0 (negative strides are refused, as torch
  refuses them), at most :data:`MAX_NDIM` dimensions, and the view's last element lies
  inside the storage; a tensor has no more elements than its storage (stride-0 or
  overlapping expansions are refused);
* non-contiguous views are copied; all copies together are at most twice the storage
  bytes read plus :data:`TENSOR_COPY_SLACK`.
"""

from __future__ import annotations

import math
import reprlib
import struct
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

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


_PLAIN_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageDtypes(Mapping):
    """Storage class name (as torch pickles it) -> numpy dtype of its elements. Read-only;
    ``BFloat16Storage`` imports ``ml_dtypes`` (most of this module's import time) on first use."""

    __slots__ = ()
    _NAMES = ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
              "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage")

    def __getitem__(self, name: str) -> np.dtype:
        if name == "BFloat16Storage":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return _PLAIN_DTYPES[name]

    def __iter__(self):
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


STORAGE_DTYPES: Mapping[str, np.dtype] = _StorageDtypes()


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


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class TensorInfo:
    """What :func:`check_checkpoint` returns in place of a tensor (no data is read)."""

    shape: tuple
    dtype: np.dtype


class _Storage:
    """One storage of this load: its declared type and size, and (when read) its elements."""

    __slots__ = ("key", "dtype", "numel", "array", "load")

    def __init__(self, key: str, dtype: np.dtype, numel: int, array: np.ndarray | None, load: "_Load"):
        self.key, self.dtype, self.numel, self.array, self.load = key, dtype, numel, array, load


def _as_index(value: Any, what: str) -> int:
    if type(value) is not int:
        raise _Malformed(f"invalid tensor: {what} must be an integer, got {_short(value)}")
    if value < 0:
        raise _Malformed(f"invalid tensor: negative {what} {value}")
    if value >= 1 << 62:
        raise _Malformed(f"invalid tensor: {what} {_short(value)} is out of range")
    return value


def _as_dims(value: Any, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list):
        raise _Malformed(f"invalid tensor: {what} must be a tuple of integers, got {_short(value)}")
    if len(value) > MAX_NDIM:
        raise _Malformed(f"invalid tensor: {len(value)} dimensions (at most {MAX_NDIM})")
    for v in value:
        if type(v) is not int:
            raise _Malformed(f"invalid tensor: {what} must be a tuple of integers, got {_short(value)}")
        if v < 0:
            kind = "strides are" if what == "stride" else f"{what} entries are"
            raise _Malformed(f"invalid tensor: {what} {_short(tuple(value))}: negative {kind} not supported")
        if v >= 1 << 62:
            raise _Malformed(f"invalid tensor: {what} {_short(tuple(value))} is out of range")
    return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2``: validate the view against its storage, then build it."""
    del requires_grad, metadata
    if not isinstance(storage, _Storage):
        raise _Malformed(f"invalid tensor: its storage is {_short(storage)}, not a storage of this archive")
    if backward_hooks is not None and not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise _Malformed("invalid tensor: backward hooks are not supported")
    offset = _as_index(storage_offset, "storage offset")
    shape = _as_dims(size, "size")
    strides = _as_dims(stride, "stride")
    if len(shape) != len(strides):
        raise _Malformed(f"invalid tensor: size {_short(shape)} and stride {_short(strides)} differ in length")
    numel = math.prod(shape)
    where = f"storage '{_clip(storage.key)}' ({storage.numel} elements)"
    if numel == 0:
        if offset > storage.numel:
            raise _Malformed(f"invalid tensor: storage offset {offset} lies past the end of {where}")
        if math.prod(n for n in shape if n) * storage.dtype.itemsize >= 1 << 62:
            raise _Malformed(f"invalid tensor: empty tensor of shape {_short(shape)} is too large to describe")
    else:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= storage.numel:
            raise _Malformed(
                f"invalid tensor: view of shape {_short(shape)}, stride {_short(strides)} at offset {offset} "
                f"runs past the end of {where}"
            )
        if numel > storage.numel:
            raise _Malformed(
                f"invalid tensor: shape {_short(shape)} has {_short(numel)} elements, more than {where} "
                "(overlapping or stride-0 views are not supported)"
            )
    return storage.load.view(storage, offset, shape, strides, numel)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad
    if not isinstance(data, (np.ndarray, TensorInfo)):
        raise _Malformed(f"invalid parameter: expected a tensor, got {_short(data)}")
    if backward_hooks is not None and not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise _Malformed("invalid parameter: backward hooks are not supported")
    return data


def _codecs_encode(text, encoding="latin1"):
    # Protocol-2 pickles store ``bytes`` as _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {_short(encoding)}")
    if type(text) is not str:
        raise _Malformed(f"_codecs.encode of {_short(text)}, not a str")
    return text.encode("latin1")


class _OrderedDict(dict):
    """Stand-in for ``collections.OrderedDict`` (plain dicts keep order); the attributes torch
    attaches to state dicts (``_metadata``) arrive through ``BUILD`` and are ignored. Built empty
    (its items arrive through ``SETITEMS``, where keys are checked)."""

    def __init__(self, *args, **kwargs):
        if args or kwargs:
            raise _Malformed("OrderedDict called with arguments (its items must come from SETITEMS)")
        super().__init__()


def _builtin_dict(*args, **kwargs):
    """Stand-in for ``builtins.dict`` (omegaconf records it as a node's object type)."""
    if args or kwargs:
        raise _Malformed("builtins.dict called with arguments (its items must come from SETITEMS)")
    return {}


# Allowed globals shared by every layout: (module, name) -> what it resolves to. Read-only.
BASE_ALLOWED: Mapping[tuple[str, str], Any] = types.MappingProxyType({
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
})


# --- omegaconf configs (the diffusion checkpoint's per-band ``cfg``) ----------------------
# The pickled DictConfig/ListConfig/value nodes are rebuilt as inert stand-ins that only
# record their state; :func:`plain_config` then turns them into dicts, lists and scalars.


class _ConfigObject:
    _args: tuple = ()
    _state: Any = None

    def __init__(self, *args, **kwargs):
        self._args = args

    def _set_state(self, state):  # BUILD, applied by the interpreter to objects of this load only
        self._state = state

    def __reduce__(self):  # never re-pickled
        raise TypeError("stand-in objects cannot be pickled")


class _DictConfig(_ConfigObject):
    pass


class _ListConfig(_ConfigObject):
    pass


class _ValueNode(_ConfigObject):
    pass


class _Metadata(_ConfigObject):
    pass


def _defaultdict(*args):
    return {}


class _AnyType:
    """Stand-in for ``typing.Any`` (omegaconf records it as a node's type)."""

    __slots__ = ()

    def __repr__(self):
        return "typing.Any"


_ANY = _AnyType()

OMEGACONF_ALLOWED: Mapping[tuple[str, str], Any] = types.MappingProxyType({
    ("omegaconf.dictconfig", "DictConfig"): _DictConfig,
    ("omegaconf.listconfig", "ListConfig"): _ListConfig,
    ("omegaconf.base", "ContainerMetadata"): _Metadata,
    ("omegaconf.base", "Metadata"): _Metadata,
    **{("omegaconf.nodes", n): _ValueNode for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode")},
    ("typing", "Any"): _ANY,
    ("builtins", "dict"): _builtin_dict,
    ("builtins", "list"): list,
    ("builtins", "int"): int,  # a ListConfig records its key type
    ("collections", "defaultdict"): _defaultdict,
})


def _config_state(obj: _ConfigObject) -> dict:
    state = obj._state
    if isinstance(state, tuple):  # (dict state, slot state)
        merged: dict = {}
        for part in state:
            if isinstance(part, dict):
                merged.update(part)
        state = merged
    return state if isinstance(state, dict) else {}


_CONFIG_SCALARS = (str, int, float, bool, type(None))


def plain_config(obj: Any) -> Any:
    """Stand-in omegaconf objects (and containers of them) -> plain dicts, lists and scalars.

    Raises :class:`CheckpointError` for a cycle, nesting deeper than :data:`MAX_NESTING`,
    more than :data:`MAX_OBJECT_VISITS` nodes (shared references expanded) or a value that
    is not a plain scalar.
    """
    visits = [0]
    path: set[int] = set()

    def convert(node: Any, depth: int) -> Any:
        visits[0] += 1
        if visits[0] > MAX_OBJECT_VISITS:
            raise CheckpointError(f"config expands to more than {MAX_OBJECT_VISITS} nodes (shared references)")
        if isinstance(node, _CONFIG_SCALARS):
            return node
        if depth > MAX_NESTING:
            raise CheckpointError(f"config nests deeper than {MAX_NESTING} levels")
        if id(node) in path:
            raise CheckpointError("config contains a cycle (a node inside itself)")
        path.add(id(node))
        try:
            if isinstance(node, _DictConfig):
                content = _config_state(node).get("_content")
                if content is None or isinstance(content, str):  # None, "???" (missing) or "${...}"
                    return content
                return convert_dict(content, depth, "DictConfig content")
            if isinstance(node, _ListConfig):
                content = _config_state(node).get("_content")
                if content is None or isinstance(content, str):
                    return content
                if not isinstance(content, (list, tuple)):
                    raise CheckpointError(f"ListConfig content is {_short(content)}, not a list")
                return [convert(v, depth + 1) for v in content]
            if isinstance(node, _ValueNode):
                return convert(_config_state(node).get("_val"), depth + 1)
            if isinstance(node, dict):
                return convert_dict(node, depth, "config mapping")
            if isinstance(node, (list, tuple)):
                return type(node)(convert(v, depth + 1) for v in node)
            raise CheckpointError(f"config value {_short(node)} is not a plain scalar, mapping or list")
        finally:
            path.discard(id(node))

    def convert_dict(content: Any, depth: int, what: str) -> dict:
        if not isinstance(content, dict):
            raise CheckpointError(f"{what} is {_short(content)}, not a mapping")
        out = {}
        for k, v in content.items():
            if not isinstance(k, _CONFIG_SCALARS):
                raise CheckpointError(f"config key {_short(k)} is not a plain scalar")
            out[str(k) if what == "DictConfig content" else k] = convert(v, depth + 1)
        return out

    return convert(obj, 0)


# --- the pickle interpreter ----------------------------------------------------------------

_LEAF_TYPES = (str, bytes, int, float, bool, type(None), np.ndarray, TensorInfo, _ConfigObject)
_DICT_TYPES = (dict, _OrderedDict)


class _Machine:
    """Executes one pickle with the allow-list; see the module docstring for its limits."""

    def __init__(self, data: bytes, allowed: Mapping[tuple[str, str], Any], load: "_Load"):
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.stack: list = []
        self.metastack: list = []
        self.memo: dict = {}
        self.allowed = allowed
        self.global_names = {id(v): f"{m}.{n}" for (m, n), v in allowed.items()}
        self.load = load
        self.ops = 0
        self.call_bytes = 0
        self.nest: dict[int, int] = {}  # id(tuple or frozenset built here) -> nesting depth
        self.keep: list = []  # keeps the objects whose ids are recorded above alive
        self.created: set[int] = set()  # ids of stand-in objects this load built (BUILD targets)
        self.composite_keys = 0

    # -- reading ---------------------------------------------------------------------------
    def read(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise _Malformed(f"truncated: needs {n} more bytes, {self.end - self.pos} left")
        start = self.pos
        self.pos += n
        return self.data[start:self.pos]

    def unpack(self, fmt: str, size: int):
        return struct.unpack(fmt, self.read(size))[0]

    def readline(self) -> str:
        stop = self.data.find(b"\n", self.pos, self.pos + _MAX_LINE)
        if stop < 0:
            raise _Malformed("GLOBAL name is unterminated or longer than 1024 bytes")
        line = self.data[self.pos:stop]
        self.pos = stop + 1
        return line.decode("utf-8")

    # -- stack -----------------------------------------------------------------------------
    def pop(self):
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.metastack:
            raise _Malformed("no MARK on the stack")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def top(self):
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack[-1]

    # -- objects ---------------------------------------------------------------------------
    def depth_of(self, obj) -> int:
        if type(obj) in (tuple, frozenset):
            return self.nest.get(id(obj), 1)
        return 0

    def hashable(self, obj):
        """``obj`` is about to be hashed as a dict key or set element. Keys whose hashes a file
        could make collide (tuples and frozensets, whose hash is an unkeyed mix of their items,
        and integers of 2**61 - 1 or more, hashed modulo that) are limited in number, since n
        colliding keys cost n**2 to insert; tuples/frozensets built here are depth-checked already."""
        kind = type(obj)
        if kind is int and -_HASH_MODULUS < obj < _HASH_MODULUS:
            return obj
        if kind in (tuple, frozenset):
            if id(obj) not in self.nest:
                raise _Malformed(f"unexpected {kind.__name__} key not built by this pickle")
        elif kind is not int:
            return obj  # str/bytes (randomised hashes), float, bool, None, identity-hashed objects
        self.composite_keys += 1
        if self.composite_keys > MAX_COMPOSITE_KEYS:
            raise _Malformed(f"more than {MAX_COMPOSITE_KEYS} tuple, frozenset or huge-integer dict keys / set items")
        return obj

    def new_nested(self, obj):
        depth = 1 + max((self.depth_of(x) for x in obj), default=0)
        if depth > MAX_NESTING:
            raise _Malformed(f"tuples nested deeper than {MAX_NESTING} levels")
        self.nest[id(obj)] = depth
        self.keep.append(obj)
        return obj

    def container(self, obj, kinds: tuple, op: str):
        if type(obj) not in kinds or id(obj) in self.global_names:
            raise _Malformed(f"{op} on {_short(obj)}, which is not a {' or '.join(k.__name__ for k in kinds)}")
        return obj

    def callable_global(self, func, op: str):
        if id(func) not in self.global_names or not callable(func):
            raise _Malformed(f"{op} calls {_short(func)}, which is not an allow-listed callable")
        return self.global_names[id(func)]

    def called(self, result, name: str):
        if isinstance(result, (tuple, frozenset)):
            raise _Malformed(f"{name} returned a {type(result).__name__}")
        if not isinstance(result, (np.ndarray, TensorInfo)):
            self.call_bytes += sys.getsizeof(result)
            if self.call_bytes > MAX_CALL_BYTES:
                raise _Malformed(f"calls to allow-listed globals built more than {MAX_CALL_BYTES >> 20} MiB of objects")
        if isinstance(result, (_ConfigObject, _OrderedDict)):
            self.created.add(id(result))
            self.keep.append(result)
        return result

    def run(self):
        dispatch = _DISPATCH
        while True:
            if self.pos >= self.end:
                raise _Malformed("pickle ends without STOP")
            self.ops += 1
            if self.ops > MAX_PICKLE_OPS:
                raise _Malformed(f"more than {MAX_PICKLE_OPS} opcodes")
            code = self.data[self.pos]
            self.pos += 1
            handler = dispatch[code]
            if handler is None:
                raise _Malformed(f"unsupported pickle opcode {bytes([code])!r}")
            if handler is _op_stop:
                return self.pop()
            handler(self)


# Opcode handlers -----------------------------------------------------------------------------

def _op_stop(m: _Machine):  # handled in run()
    raise AssertionError


def _op_proto(m):
    version = m.read(1)[0]
    if not 2 <= version <= 5:
        raise _Malformed(f"unsupported pickle protocol {version}")


def _op_frame(m):
    if m.unpack("<Q", 8) > m.end - m.pos:
        raise _Malformed("frame longer than the data left")


def _op_mark(m):
    m.metastack.append(m.stack)
    m.stack = []


def _op_pop(m):
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()


def _op_pop_mark(m):
    m.pop_mark()


def _op_dup(m):
    m.stack.append(m.top())


def _push_const(value):
    return lambda m: m.stack.append(value)


def _op_binint(m):
    m.stack.append(m.unpack("<i", 4))


def _op_binint1(m):
    m.stack.append(m.read(1)[0])


def _op_binint2(m):
    m.stack.append(m.unpack("<H", 2))


def _long(m, n):
    if n < 0:
        raise _Malformed("negative LONG4 length")
    if n > MAX_INT_BYTES:
        raise _Malformed(f"integer of {n} bytes (at most {MAX_INT_BYTES})")
    m.stack.append(int.from_bytes(m.read(n), "little", signed=True))


def _op_long1(m):
    _long(m, m.read(1)[0])


def _op_long4(m):
    _long(m, m.unpack("<i", 4))


def _op_binfloat(m):
    m.stack.append(m.unpack(">d", 8))


def _text(fmt, size):
    def handler(m):
        n = m.unpack(fmt, size) if fmt else m.read(1)[0]
        m.stack.append(m.read(n).decode("utf-8", "surrogatepass"))
    return handler


def _binary(fmt, size):
    def handler(m):
        n = m.unpack(fmt, size) if fmt else m.read(1)[0]
        m.stack.append(m.read(n))
    return handler


def _op_empty_tuple(m):
    m.stack.append(m.new_nested(()))


def _op_tuple(m):
    items = m.new_nested(tuple(m.pop_mark()))  # pop_mark replaces m.stack: evaluate before appending
    m.stack.append(items)


def _tuple_n(n):
    def handler(m):
        if len(m.stack) < n:
            raise _Malformed("stack underflow")
        items = tuple(m.stack[-n:])
        del m.stack[-n:]
        m.stack.append(m.new_nested(items))
    return handler


def _op_empty_list(m):
    m.stack.append([])


def _op_list(m):
    items = m.pop_mark()
    m.stack.append(items)


def _op_append(m):
    value = m.pop()
    m.container(m.top(), (list,), "APPEND").append(value)


def _op_appends(m):
    items = m.pop_mark()
    m.container(m.top(), (list,), "APPENDS").extend(items)


def _op_empty_dict(m):
    m.stack.append({})


def _set_items(m, target, items, op):
    if len(items) % 2:
        raise _Malformed(f"{op} with an odd number of items")
    m.container(target, _DICT_TYPES, op)
    for i in range(0, len(items), 2):
        target[m.hashable(items[i])] = items[i + 1]


def _op_dict(m):
    items = m.pop_mark()
    d: dict = {}
    _set_items(m, d, items, "DICT")
    m.stack.append(d)


def _op_setitem(m):
    value = m.pop()
    key = m.pop()
    _set_items(m, m.top(), [key, value], "SETITEM")


def _op_setitems(m):
    items = m.pop_mark()
    _set_items(m, m.top(), items, "SETITEMS")


def _op_empty_set(m):
    m.stack.append(set())


def _op_additems(m):
    items = m.pop_mark()
    target = m.container(m.top(), (set,), "ADDITEMS")
    for item in items:
        target.add(m.hashable(item))


def _op_frozenset(m):
    items = m.pop_mark()
    frozen = m.new_nested(frozenset(m.hashable(x) for x in items))
    m.stack.append(frozen)


def _find_global(m, module: str, name: str):
    key = ("builtins", name) if module == "__builtin__" else (module, name)  # protocol-2 spelling
    if key in m.allowed:
        return m.allowed[key]
    raise _Unsafe(
        f"refusing to load, it references the global '{_clip(module)}.{_clip(name)}' "
        "which is not in the allow-list for this checkpoint layout"
    )


def _op_global(m):
    module = m.readline()
    name = m.readline()
    m.stack.append(_find_global(m, module, name))


def _op_stack_global(m):
    name = m.pop()
    module = m.pop()
    if type(module) is not str or type(name) is not str:
        raise _Malformed("STACK_GLOBAL with a non-string module or name")
    m.stack.append(_find_global(m, module, name))


def _op_reduce(m):
    args = m.pop()
    func = m.pop()
    name = m.callable_global(func, "REDUCE")
    if type(args) is not tuple:
        raise _Malformed(f"REDUCE arguments are {_short(args)}, not a tuple")
    m.stack.append(m.called(func(*args), name))


def _newobj(m, cls, args, kwargs):
    name = m.callable_global(cls, "NEWOBJ")
    if not isinstance(cls, type):
        raise _Malformed(f"NEWOBJ on {name}, which is not a class")
    if type(args) is not tuple or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
        raise _Malformed("NEWOBJ with malformed arguments")
    if issubclass(cls, _ConfigObject):
        obj = cls(*args, **kwargs)
    else:
        obj = cls.__new__(cls, *args, **kwargs)
    m.stack.append(m.called(obj, name))


def _op_newobj(m):
    args = m.pop()
    cls = m.pop()
    _newobj(m, cls, args, {})


def _op_newobj_ex(m):
    kwargs = m.pop()
    args = m.pop()
    cls = m.pop()
    _newobj(m, cls, args, kwargs)


def _op_build(m):
    state = m.pop()
    inst = m.top()
    if id(inst) in m.global_names:
        raise _Unsafe(f"refusing to load, it tries to change the state of the global '{m.global_names[id(inst)]}' (BUILD)")
    if id(inst) not in m.created:
        raise _Malformed(f"BUILD on {_short(inst)}, which is not an object this pickle created")
    if isinstance(inst, _ConfigObject):
        inst._set_state(state)
    elif state is not None and not isinstance(state, (dict, tuple)):  # _OrderedDict: attributes are ignored
        raise _Malformed(f"BUILD of an OrderedDict with state {_short(state)}")


def _op_binpersid(m):
    m.stack.append(m.load.persistent_load(m.pop()))


def _memo_get(fmt, size):
    def handler(m):
        idx = m.unpack(fmt, size) if fmt else m.read(1)[0]
        try:
            m.stack.append(m.memo[idx])
        except KeyError:
            raise _Malformed(f"memo key {idx} was never stored") from None
    return handler


def _memo_put(fmt, size):
    def handler(m):
        idx = m.unpack(fmt, size) if fmt else m.read(1)[0]
        m.memo[idx] = m.top()
    return handler


def _op_memoize(m):
    m.memo[len(m.memo)] = m.top()


_HANDLERS = {
    b".": _op_stop, b"\x80": _op_proto, b"\x95": _op_frame,
    b"(": _op_mark, b"0": _op_pop, b"1": _op_pop_mark, b"2": _op_dup,
    b"N": _push_const(None), b"\x88": _push_const(True), b"\x89": _push_const(False),
    b"J": _op_binint, b"K": _op_binint1, b"M": _op_binint2, b"\x8a": _op_long1, b"\x8b": _op_long4,
    b"G": _op_binfloat,
    b"X": _text("<I", 4), b"\x8c": _text(None, 1), b"\x8d": _text("<Q", 8),
    b"B": _binary("<I", 4), b"C": _binary(None, 1), b"\x8e": _binary("<Q", 8),
    b")": _op_empty_tuple, b"t": _op_tuple, b"\x85": _tuple_n(1), b"\x86": _tuple_n(2), b"\x87": _tuple_n(3),
    b"]": _op_empty_list, b"l": _op_list, b"a": _op_append, b"e": _op_appends,
    b"}": _op_empty_dict, b"d": _op_dict, b"s": _op_setitem, b"u": _op_setitems,
    b"\x8f": _op_empty_set, b"\x90": _op_additems, b"\x91": _op_frozenset,
    b"c": _op_global, b"\x93": _op_stack_global,
    b"R": _op_reduce, b"\x81": _op_newobj, b"\x92": _op_newobj_ex, b"b": _op_build,
    b"Q": _op_binpersid,
    b"h": _memo_get(None, 1), b"j": _memo_get("<I", 4), b"q": _memo_put(None, 1), b"r": _memo_put("<I", 4),
    b"\x94": _op_memoize,
}
_DISPATCH: list = [None] * 256
for _code, _handler in _HANDLERS.items():
    _DISPATCH[_code[0]] = _handler


def _check_result(root: Any) -> None:
    """The loaded object: only plain values, no cycles, bounded nesting and expanded size."""
    visits = 0
    on_path: set[int] = set()
    todo: list = [(root, 0, False)]
    while todo:
        obj, depth, leaving = todo.pop()
        if leaving:
            on_path.discard(id(obj))
            continue
        visits += 1
        if visits > MAX_OBJECT_VISITS:
            raise _Malformed(f"the loaded object expands to more than {MAX_OBJECT_VISITS} nodes (shared references)")
        kind = type(obj)
        if kind in (dict, _OrderedDict, list, tuple, set, frozenset):
            if depth >= MAX_NESTING:
                raise _Malformed(f"containers nested deeper than {MAX_NESTING} levels")
            if id(obj) in on_path:
                name = kind.__name__.lstrip("_")
                raise _Malformed(f"cyclic containers: {'an' if name[0] in 'aeiouAEIOU' else 'a'} {name} contains itself")
            on_path.add(id(obj))
            todo.append((obj, depth, True))
            if kind in (dict, _OrderedDict):
                for key, value in obj.items():
                    todo.append((key, depth + 1, False))
                    todo.append((value, depth + 1, False))
            else:
                todo.extend((item, depth + 1, False) for item in obj)
        elif not isinstance(obj, _LEAF_TYPES):
            what = "a storage outside any tensor" if isinstance(obj, _Storage) else _short(obj)
            raise _Malformed(f"unexpected value in the loaded object: {what}")


# --- the archive -------------------------------------------------------------------------------


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
