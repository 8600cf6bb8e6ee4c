"""Read PyTorch ``torch.save`` zip archives without executing code and without torch.

A ``.pt`` file is a zip archive holding ``<root>/data.pkl`` (a pickle) and one raw
byte file per tensor storage under ``<root>/data/<key>``. Full unpickling would run
whatever callables the pickle names, so this module uses a restricted unpickler:
only the globals listed in an explicit allow-list resolve, each to a small
function written here that builds numpy arrays or plain Python containers. Any
other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) makes the
load fail with :class:`UnsafeCheckpointError` naming it, before anything runs.

Tensors come back as contiguous ``numpy.ndarray`` (bfloat16 through ``ml_dtypes``).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a PyTorch archive."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that references a global outside the allow-list."""


# Storage class name (as torch pickles it) -> numpy dtype of its elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    flat = storage
    itemsize = flat.dtype.itemsize
    if len(size) == 0:
        return np.array(flat[storage_offset])
    needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
    if any(n == 0 for n in size):
        return np.zeros(size, dtype=flat.dtype)
    if needed > flat.size:
        raise CheckpointError(f"tensor view of shape {tuple(size)} runs past its storage ({flat.size} elements)")
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data


def _codecs_encode(text, encoding="latin1"):
    # Protocol-2 pickles store ``bytes`` as _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _OrderedDict(dict):
    """Stand-in for ``collections.OrderedDict`` (plain dicts keep order); accepts the
    attributes torch attaches to state dicts (``_metadata``), which are ignored."""


# Allowed globals shared by every layout: (module, name) -> what it resolves to.
BASE_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


# --- omegaconf configs (the diffusion checkpoint's per-band ``cfg``) ----------------------
# The pickled DictConfig/ListConfig/value nodes are rebuilt as inert stand-ins that only
# record their state; :func:`plain_config` then turns them into dicts, lists and scalars.


class _ConfigObject:
    def __init__(self, *args, **kwargs):
        self._args = args
        self._state = None

    def __setstate__(self, state):
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


_ANY = object()

OMEGACONF_ALLOWED: dict[tuple[str, str], Any] = {
    ("omegaconf.dictconfig", "DictConfig"): _DictConfig,
    ("omegaconf.listconfig", "ListConfig"): _ListConfig,
    ("omegaconf.base", "ContainerMetadata"): _Metadata,
    ("omegaconf.base", "Metadata"): _Metadata,
    **{("omegaconf.nodes", n): _ValueNode for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode")},
    ("typing", "Any"): _ANY,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "int"): int,  # a ListConfig records its key type
    ("collections", "defaultdict"): _defaultdict,
}


def _config_state(obj: _ConfigObject) -> dict:
    state = obj._state
    if isinstance(state, tuple):  # (dict state, slot state)
        merged: dict = {}
        for part in state:
            if isinstance(part, dict):
                merged.update(part)
        state = merged
    return state if isinstance(state, dict) else {}


def plain_config(obj: Any) -> Any:
    """Stand-in omegaconf objects (and containers of them) -> plain dicts, lists and scalars."""
    if isinstance(obj, _DictConfig):
        content = _config_state(obj).get("_content")
        return None if content is None else {str(k): plain_config(v) for k, v in content.items()}
    if isinstance(obj, _ListConfig):
        content = _config_state(obj).get("_content")
        return None if content is None else [plain_config(v) for v in content]
    if isinstance(obj, _ValueNode):
        return plain_config(_config_state(obj).get("_val"))
    if isinstance(obj, dict):
        return {k: plain_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_config(v) for v in obj)
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: Mapping[tuple[str, str], Any], load_storage: Callable, source: str):
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module: str, name: str):
        key = (module, name)
        if module == "__builtin__":  # protocol-2 spelling of builtins
            key = ("builtins", name)
        if key in self._allowed:
            return self._allowed[key]
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load, it references the global '{module}.{name}' "
            "which is not in the allow-list for this checkpoint layout"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"{self._source}: unsupported storage type {storage_type!r}")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def load_checkpoint(path: str | Path, extra_allowed: Mapping[tuple[str, str], Any] | None = None) -> Any:
    """Load a ``torch.save`` zip archive safely; tensors become numpy arrays.

    ``extra_allowed`` adds the globals a particular layout needs (for example the
    omegaconf classes of the diffusion checkpoint), each mapped to a stand-in.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    allowed = dict(BASE_ALLOWED)
    if extra_allowed:
        allowed.update(extra_allowed)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"{path}: not a PyTorch zip archive (legacy or corrupt checkpoint format): {exc}"
        ) from None
    with archive:
        names = archive.namelist()
        pkl_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise CheckpointError(f"{path}: expected exactly one data.pkl in the archive, found {len(pkl_names)}")
        root = pkl_names[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{root}byteorder" in names:
            byteorder = archive.read(f"{root}byteorder").decode().strip()
        cache: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in cache:
                member = f"{root}data/{key}"
                try:
                    raw = archive.read(member)
                except KeyError:
                    raise CheckpointError(f"{path}: storage {member} is missing") from None
                dt = dtype.newbyteorder("<" if byteorder == "little" else ">") if dtype.itemsize > 1 else dtype
                arr = np.frombuffer(raw, dtype=dt)
                if arr.size < numel:
                    raise CheckpointError(f"{path}: storage {member} holds {arr.size} elements, expected {numel}")
                cache[key] = arr.astype(dtype, copy=False)
            return cache[key]

        unpickler = _RestrictedUnpickler(archive.read(pkl_names[0]), allowed, load_storage, str(path))
        try:
            return unpickler.load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed checkpoint pickle: {exc}") from None
