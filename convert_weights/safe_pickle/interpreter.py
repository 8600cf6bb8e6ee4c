"""The pickle interpreter: a bounded machine for the binary pickle opcodes that build data (protocols
2 to 5). Globals resolve only through the allow-list it is given, calls go only to allow-listed
stand-ins, and :func:`_check_result` vets what a pickle built; the package docstring lists its limits.

Long because the machine and its opcode handlers are one unit: each handler relies on the machine's
checks (stack, memo, nesting, key and call budgets), which splitting would spread across modules.
"""

from __future__ import annotations

import struct
import sys
from typing import Any, Mapping

import numpy as np

from convert_weights.safe_pickle.allowed import TensorInfo, _ConfigObject, _OrderedDict, _Storage
from convert_weights.safe_pickle.limits import (
    _HASH_MODULUS,
    _MAX_LINE,
    MAX_CALL_BYTES,
    MAX_COMPOSITE_KEYS,
    MAX_INT_BYTES,
    MAX_NESTING,
    MAX_OBJECT_VISITS,
    MAX_PICKLE_OPS,
    _clip,
    _Malformed,
    _short,
    _Unsafe,
)

_LEAF_TYPES = (str, bytes, int, float, bool, type(None), np.ndarray, TensorInfo, _ConfigObject)
_DICT_TYPES = (dict, _OrderedDict)


class _Machine:
    """Executes one pickle with the allow-list; see the package docstring for its limits. ``load`` (the
    archive's :class:`convert_weights.safe_pickle.archive._Load`) resolves persistent ids to storages."""

    def __init__(self, data: bytes, allowed: Mapping[tuple[str, str], Any], load: Any):
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
