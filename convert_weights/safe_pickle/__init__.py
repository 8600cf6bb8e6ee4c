"""Read PyTorch ``torch.save`` zip archives without executing code and without torch.

A ``.pt`` file is a zip archive holding ``<root>/data.pkl`` (a pickle) and one raw
byte file per tensor storage under ``<root>/data/<key>`` (plus ``<root>/byteorder``).
Full unpickling would run whatever callables the pickle names, so this module does not
use :mod:`pickle` at all: a small opcode interpreter written here executes the pickle,
and only the globals listed in an explicit allow-list resolve, each to a stand-in that
builds numpy arrays or plain Python containers. Any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen``...) makes the load fail with
:class:`UnsafeCheckpointError` naming it, before anything runs.

Its modules: :mod:`~convert_weights.safe_pickle.archive` (the zip archive, storages and tensors, and
the two entry points), :mod:`~convert_weights.safe_pickle.interpreter` (the opcode machine),
:mod:`~convert_weights.safe_pickle.allowed` (the allow-listed stand-ins) and
:mod:`~convert_weights.safe_pickle.limits` (the limits below and the errors).

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

from convert_weights.safe_pickle.allowed import (
    BASE_ALLOWED,
    OMEGACONF_ALLOWED,
    STORAGE_DTYPES,
    TensorInfo,
    plain_config,
)
from convert_weights.safe_pickle.archive import check_checkpoint, load_checkpoint
from convert_weights.safe_pickle.limits import (
    MAX_CALL_BYTES,
    MAX_COMPOSITE_KEYS,
    MAX_COMPRESSION_RATIO,
    MAX_INT_BYTES,
    MAX_NDIM,
    MAX_NESTING,
    MAX_OBJECT_VISITS,
    MAX_PICKLE_BYTES,
    MAX_PICKLE_OPS,
    MAX_ZIP_ENTRIES,
    TENSOR_COPY_SLACK,
    CheckpointError,
    UnsafeCheckpointError,
)

__all__ = [
    "BASE_ALLOWED", "OMEGACONF_ALLOWED", "STORAGE_DTYPES", "TensorInfo", "plain_config", "check_checkpoint",
    "load_checkpoint", "MAX_CALL_BYTES", "MAX_COMPOSITE_KEYS", "MAX_COMPRESSION_RATIO", "MAX_INT_BYTES", "MAX_NDIM",
    "MAX_NESTING", "MAX_OBJECT_VISITS", "MAX_PICKLE_BYTES", "MAX_PICKLE_OPS", "MAX_ZIP_ENTRIES", "TENSOR_COPY_SLACK",
    "CheckpointError", "UnsafeCheckpointError",
]
