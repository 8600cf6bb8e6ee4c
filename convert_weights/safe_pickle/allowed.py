"""The allow-lists: the globals a pickle may name, each resolving to an inert stand-in that builds
numpy arrays or plain Python containers (never the real callable), and the storage types a tensor may
use. :data:`BASE_ALLOWED` serves every layout; :data:`OMEGACONF_ALLOWED` adds the omegaconf classes of
the diffusion checkpoint, whose stand-ins :func:`plain_config` turns into dicts, lists and scalars."""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from convert_weights.safe_pickle.limits import (
    MAX_NDIM,
    MAX_NESTING,
    MAX_OBJECT_VISITS,
    CheckpointError,
    UnsafeCheckpointError,
    _clip,
    _Malformed,
    _short,
)

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
            import ml_dtypes  # heavy (~0.5 s): only bfloat16 storages need it

            return np.dtype(ml_dtypes.bfloat16)
        return _PLAIN_DTYPES[name]

    def __iter__(self):
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


STORAGE_DTYPES: Mapping[str, np.dtype] = _StorageDtypes()



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
    """One storage of this load: its declared type and size, and (when read) its elements; ``load`` is the
    archive's load (:class:`convert_weights.safe_pickle.archive._Load`), which cuts tensors from it."""

    __slots__ = ("key", "dtype", "numel", "array", "load")

    def __init__(self, key: str, dtype: np.dtype, numel: int, array: np.ndarray | None, load: Any):
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
