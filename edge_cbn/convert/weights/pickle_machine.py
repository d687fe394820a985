"""A pickle machine for torch checkpoints that calls nothing.

It builds plain data (None, booleans, numbers, strings, bytes, tuples, lists, dicts, sets) and, from an
allowlist of names, records of what torch's tensor-rebuild functions would make: `StorageRef` for a
persistent id, `TensorRef` for `_rebuild_tensor*`.  A global is pushed as an immutable `Global` name,
never as the object, so no opcode can reach an object shared between loads:

- GLOBAL / STACK_GLOBAL outside the allowlist, INST, OBJ, NEWOBJ(_EX) and EXT*: refused (`UnsafeCheckpoint`)
  before anything is built from them;
- REDUCE only on an allowed function, with its arity; BUILD only on an OrderedDict built by this pickle
  (a state dict's `_metadata`, dropped); APPEND(S) only on lists, SETITEM(S) only on dicts, ADDITEMS only
  on sets; dict keys and set items are scalars (hashing a deeply nested tuple overflows C's stack);
- the memo holds references, so a DAG of memo references ("billion laughs") costs one step per opcode;
  nothing here recurses, so deep nesting costs memory, not stack;
- every opcode is charged `OP_BYTES` and every string or bytes payload its size against the load's
  `Budget`, so the objects a pickle can make are bounded by the bytes that budget allows.

Every failure is a `BadInput` naming the file, the byte and the opcode.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import pickletools
import re
import struct

from ...runtime.errors import BadInput

OP_BYTES = 64  # charged per opcode: more than the objects, stack slot and memo entry one opcode can add
MAX_PROTOCOL = 5
MAX_COUNT = 2**62  # storage sizes, offsets, sizes and strides above this are corrupt, whatever the dtype
_SCALARS = (str, int, float, bool, bytes, type(None))

# torch dtype name -> numpy dtype of its bytes (bfloat16's are widened to float32 by the reader).
DTYPES = {
    "float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<u2", "complex64": "<c8",
    "complex128": "<c16", "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1",
    "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "?",
}
_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
# Real torch types this reader does not convert: named as unsupported, not as unsafe.
_UNSUPPORTED_TYPES = re.compile(r"Q\w*Storage|ComplexHalfStorage|float8_\w+|float4_\w+|bits\w+|complex32"
                                r"|chalf|q(u)?int\w+|u?int[1-7]")
# Real torch rebuild paths for tensors this reader does not make: named as unsupported, not as unsafe.
_UNSUPPORTED_CALLS = {
    ("torch._utils", "_rebuild_qtensor"): "quantized tensors",
    ("torch._utils", "_rebuild_sparse_tensor"): "sparse tensors",
    ("torch._utils", "_rebuild_nested_tensor"): "nested tensors",
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): "meta tensors (no data)",
    ("torch._utils", "_rebuild_wrapper_subclass"): "tensor subclasses",
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): "device tensors",
    ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): "device tensors",
    ("torch._tensor", "_rebuild_from_type_v2"): "tensor subclasses or tensors with attributes",
}
_TENSOR_ARITY = {"_rebuild_tensor": (4, 4), "_rebuild_tensor_v2": (6, 7), "_rebuild_tensor_v3": (7, 8)}


class UnsafeCheckpoint(BadInput):
    """The pickle asks for a global or an instantiation outside the tensor-rebuild allowlist; nothing
    was called."""


class Budget:
    """The bytes one load may allocate or hand out; going over is a refusal, never a MemoryError."""

    def __init__(self, path, limit: int, basis: str):
        self.path, self.limit, self.basis, self.used = str(path), limit, basis, 0

    def charge(self, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.limit:
            size = f" ({megabytes(nbytes)})" if nbytes >= 2**20 else ""
            raise BadInput(self.path, f"{what}{size} takes this load past its memory limit of "
                                      f"{megabytes(self.limit)} ({self.basis}): corrupt sizes or a decompression bomb")


@dataclasses.dataclass(frozen=True)
class Global:
    """An allowed global as the machine pushes it: its name, never the object."""
    module: str
    name: str
    kind: str               # "callable", "storage" (a storage type) or "dtype"
    dtype: str | None = None  # the torch dtype name of a storage type or dtype

    def __str__(self):
        return f"{self.module}.{self.name}"


@dataclasses.dataclass(frozen=True, eq=False)
class StorageRef:
    """A persistent id ('storage', type, key, location, numel[, view]): `numel` elements of `dtype`
    (untyped storages: bytes); `view` (legacy files) is (view key, offset, size) in elements."""
    key: str
    dtype: str
    numel: int
    view: tuple | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class TensorRef:
    """What `torch._utils._rebuild_tensor*` would make, unchecked: the reader checks the layout against
    the storage before it makes a view."""
    storage: StorageRef
    offset: object
    size: object
    stride: object
    dtype: str


def _build_globals() -> dict:
    table = {(m, n): Global(m, n, "callable") for m, n in [
        ("collections", "OrderedDict"), ("torch", "Size"), ("_codecs", "encode"),
        ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
        *(("torch._utils", name) for name in _TENSOR_ARITY)]}
    table.update({("torch", n): Global("torch", n, "storage", d) for n, d in _STORAGES.items()})
    table[("torch.storage", "UntypedStorage")] = Global("torch.storage", "UntypedStorage", "storage", "uint8")
    table.update({("torch", d): Global("torch", d, "dtype", d) for d in DTYPES})
    return table


_GLOBALS = _build_globals()
_OPNAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
_STOP = ord(".")


def shorten(value, limit: int = 80) -> str:
    """A hostile value or message as a short one-line text (an integer of thousands of digits has no
    str(): Python refuses to convert it)."""
    if type(value) is int and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    full = value if isinstance(value, str) else str(value)
    return repr(full[:limit])[1:-1] + ("…" if len(full) > limit else "")


def megabytes(nbytes: int) -> str:
    return f"{nbytes / 2**20:.4g} MB" if nbytes < 2**1000 else f"2^{nbytes.bit_length() - 1} bytes or more"


def kind(obj) -> str:
    """What `obj` is, with its article, for a message: never printed (or recursed into) itself."""
    if isinstance(obj, Global):
        return f"the global {obj}"
    name = {TensorRef: "tensor", StorageRef: "storage"}.get(type(obj), type(obj).__name__)
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _ints(seq) -> bool:
    return type(seq) is tuple and all(type(v) is int and 0 <= v <= MAX_COUNT for v in seq)


class PickleMachine:
    """Runs one pickle from `data[pos:]`; `run()` gives (the object, the position after STOP).  With
    `tensors=False` (the legacy format's header pickles) it allows no global and no persistent id."""

    def __init__(self, path, budget: Budget, data, pos: int = 0, *, what: str = "the pickle", tensors=True):
        self.path, self.budget, self.data, self.pos = str(path), budget, data, pos
        self.what, self.tensors = what, tensors
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict = {}
        self.storages: dict[str, StorageRef] = {}
        self.op_at = pos

    def run(self):
        data, end = self.data, len(self.data)
        while True:
            if self.pos >= end:
                raise self.corrupt("it ends before its STOP opcode: the file is truncated")
            code = data[self.pos]
            self.op_at, self.pos = self.pos, self.pos + 1
            self.budget.charge(OP_BYTES, self.what)
            if code == _STOP:
                return self.pop(), self.pos
            handler = _HANDLERS.get(code)
            if handler is None:
                raise self.corrupt(f"opcode {_OPNAMES[code]} is not used by torch checkpoints" if code in _OPNAMES
                                   else f"byte 0x{code:02x} is not a pickle opcode")
            try:
                handler(self)
            except BadInput:
                raise
            except (ValueError, TypeError, OverflowError, struct.error) as e:  # number and text parsing
                raise self.corrupt(f"{type(e).__name__}: {shorten(e, 120)}") from None

    def corrupt(self, reason: str) -> BadInput:
        op = _OPNAMES.get(self.data[self.op_at], "?") if self.op_at < len(self.data) else "end"
        return BadInput(self.path, f"{self.what} is corrupt at byte {self.op_at} ({op}): {reason}")

    def unsafe(self, what: str) -> UnsafeCheckpoint:
        return UnsafeCheckpoint(self.path, f"refusing to load: the checkpoint {what}, which is not part of a "
                                           "plain tensor state dict (only tensors and containers are allowed); "
                                           "nothing was run")

    # -- the stream
    def read(self, n: int):
        end = self.pos + n
        if end > len(self.data):
            raise self.corrupt(f"it needs {n} more bytes, {len(self.data) - self.pos} are left: the file is "
                               "truncated")
        out, self.pos = self.data[self.pos:end], end
        return out

    def read_uint(self, n: int) -> int:
        return int.from_bytes(self.read(n), "little")

    def read_int32(self) -> int:
        return int.from_bytes(self.read(4), "little", signed=True)

    def read_line(self):
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise self.corrupt("a text argument never ends: the file is truncated")
        out, self.pos = self.data[self.pos:end], end + 1
        return out

    def payload(self, n: int, bytes_per_byte: int = 1):
        """`n` bytes of string or bytes data, charged (a str takes up to 4 bytes per UTF-8 byte)."""
        if n < 0:
            raise self.corrupt(f"negative length {n}")
        data = self.read(n)
        self.budget.charge(bytes_per_byte * n, self.what)
        return data

    # -- the stack
    def push(self, obj) -> None:
        self.stack.append(obj)

    def pop(self):
        if not self.stack:
            raise self.corrupt("the stack is empty")
        return self.stack.pop()

    def top(self):
        if not self.stack:
            raise self.corrupt("the stack is empty")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.metastack:
            raise self.corrupt("no MARK to close")
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def target(self, types: tuple, op: str):
        """The container under the top of the stack, if it is one of `types` built by this pickle."""
        found = self.top()
        if type(found) not in types:
            raise self.corrupt(f"{op} on {kind(found)}: only a {types[0].__name__} takes items")
        return found

    def key(self, key):
        if type(key) not in _SCALARS:
            raise self.corrupt(f"a dict key or set item is {kind(key)}; checkpoints use strings and numbers")
        return key

    def set_items(self, target: dict, items: list) -> None:
        if len(items) % 2:
            raise self.corrupt(f"{len(items)} items cannot be key-value pairs")
        for i in range(0, len(items), 2):
            target[self.key(items[i])] = items[i + 1]

    def memo_get(self, index: int) -> None:
        if index not in self.memo:
            raise self.corrupt(f"memo entry {shorten(index)} was never stored")
        self.push(self.memo[index])

    def memo_put(self, index: int) -> None:
        if index < 0:
            raise self.corrupt(f"negative memo index {shorten(index)}")
        self.memo[index] = self.top()


# -- opcodes: numbers and text
def _text_int(m: PickleMachine) -> int:
    line = bytes(m.read_line())
    if line in (b"00", b"01"):  # protocol 0's booleans
        return line == b"01"
    return int(line)


def _raw_unicode(m: PickleMachine) -> str:
    line = m.read_line()
    m.budget.charge(4 * len(line), m.what)
    return str(line, "raw-unicode-escape")


def _long(m: PickleMachine, n: int) -> int:
    return int.from_bytes(m.payload(n), "little", signed=True)


def _utf8(m: PickleMachine, n: int) -> str:
    return str(m.payload(n, 4), "utf-8", "surrogatepass")


def _quoted_string(m: PickleMachine) -> str:
    line = bytes(m.read_line())
    if len(line) < 2 or line[:1] not in (b'"', b"'") or line[-1:] != line[:1]:
        raise m.corrupt("a STRING argument is not quoted")
    m.budget.charge(4 * len(line), m.what)
    return str(codecs.escape_decode(line[1:-1])[0], "utf-8")  # torch reads Python 2 strings as UTF-8


_DATA_OPS = {
    "NONE": lambda m: m.push(None),
    "NEWTRUE": lambda m: m.push(True),
    "NEWFALSE": lambda m: m.push(False),
    "INT": lambda m: m.push(_text_int(m)),
    "LONG": lambda m: m.push(int(bytes(m.read_line()).rstrip(b"L"))),
    "BININT": lambda m: m.push(m.read_int32()),
    "BININT1": lambda m: m.push(m.read_uint(1)),
    "BININT2": lambda m: m.push(m.read_uint(2)),
    "LONG1": lambda m: m.push(_long(m, m.read_uint(1))),
    "LONG4": lambda m: m.push(_long(m, m.read_int32())),
    "FLOAT": lambda m: m.push(float(bytes(m.read_line()))),
    "BINFLOAT": lambda m: m.push(struct.unpack(">d", m.read(8))[0]),
    "SHORT_BINUNICODE": lambda m: m.push(_utf8(m, m.read_uint(1))),
    "BINUNICODE": lambda m: m.push(_utf8(m, m.read_uint(4))),
    "BINUNICODE8": lambda m: m.push(_utf8(m, m.read_uint(8))),
    "UNICODE": lambda m: m.push(_raw_unicode(m)),
    "STRING": lambda m: m.push(_quoted_string(m)),
    "SHORT_BINSTRING": lambda m: m.push(_utf8(m, m.read_uint(1))),
    "BINSTRING": lambda m: m.push(_utf8(m, m.read_int32())),
    "SHORT_BINBYTES": lambda m: m.push(bytes(m.payload(m.read_uint(1)))),
    "BINBYTES": lambda m: m.push(bytes(m.payload(m.read_uint(4)))),
    "BINBYTES8": lambda m: m.push(bytes(m.payload(m.read_uint(8)))),
    "BYTEARRAY8": lambda m: m.push(bytes(m.payload(m.read_uint(8)))),
}


# -- opcodes: containers, stack and memo
def _pop(m: PickleMachine) -> None:
    m.pop() if m.stack else m.pop_mark()


def _dict_from_mark(m: PickleMachine) -> None:
    out: dict = {}
    m.set_items(out, m.pop_mark())
    m.push(out)


def _setitem(m: PickleMachine) -> None:
    value, key = m.pop(), m.pop()
    m.set_items(m.target((dict, collections.OrderedDict), "SETITEM"), [key, value])


def _setitems(m: PickleMachine) -> None:
    items = m.pop_mark()
    m.set_items(m.target((dict, collections.OrderedDict), "SETITEMS"), items)


def _append(m: PickleMachine) -> None:
    item = m.pop()
    m.target((list,), "APPEND").append(item)


def _appends(m: PickleMachine) -> None:
    items = m.pop_mark()
    m.target((list,), "APPENDS").extend(items)


def _additems(m: PickleMachine) -> None:
    items = m.pop_mark()
    target = m.target((set,), "ADDITEMS")
    target.update(m.key(item) for item in items)


def _mark(m: PickleMachine) -> None:
    m.metastack.append(m.stack)
    m.stack = []


def _tuple_of(m: PickleMachine, n: int) -> None:
    items = [m.pop() for _ in range(n)][::-1]
    m.push(tuple(items))


_CONTAINER_OPS = {
    "EMPTY_TUPLE": lambda m: m.push(()),
    "EMPTY_LIST": lambda m: m.push([]),
    "EMPTY_DICT": lambda m: m.push({}),
    "EMPTY_SET": lambda m: m.push(set()),
    "MARK": _mark,
    "POP": _pop,
    "POP_MARK": lambda m: m.pop_mark(),
    "DUP": lambda m: m.push(m.top()),
    "TUPLE": lambda m: m.push(tuple(m.pop_mark())),
    "TUPLE1": lambda m: _tuple_of(m, 1),
    "TUPLE2": lambda m: _tuple_of(m, 2),
    "TUPLE3": lambda m: _tuple_of(m, 3),
    "LIST": lambda m: m.push(m.pop_mark()),
    "DICT": _dict_from_mark,
    "FROZENSET": lambda m: m.push(frozenset(m.key(item) for item in m.pop_mark())),
    "APPEND": _append,
    "APPENDS": _appends,
    "SETITEM": _setitem,
    "SETITEMS": _setitems,
    "ADDITEMS": _additems,
    "GET": lambda m: m.memo_get(_text_int(m)),
    "BINGET": lambda m: m.memo_get(m.read_uint(1)),
    "LONG_BINGET": lambda m: m.memo_get(m.read_uint(4)),
    "PUT": lambda m: m.memo_put(_text_int(m)),
    "BINPUT": lambda m: m.memo_put(m.read_uint(1)),
    "LONG_BINPUT": lambda m: m.memo_put(m.read_uint(4)),
    "MEMOIZE": lambda m: m.memo_put(len(m.memo)),
}


# -- opcodes: globals, calls and persistent ids
def _global(m: PickleMachine, module, name) -> None:
    if type(module) is not str or type(name) is not str:
        raise m.corrupt(f"a global named by {kind(module)} and {kind(name)}")
    found = _GLOBALS.get((module, name))
    if found is None and module == "torch" and _UNSUPPORTED_TYPES.fullmatch(name):
        raise BadInput(m.path, f"torch.{name} tensors are not supported (float32, float16, bfloat16, float64, "
                               "integer and bool tensors are): save the checkpoint in one of those")
    if found is None and (module, name) in _UNSUPPORTED_CALLS:
        raise BadInput(m.path, f"{module}.{name}: {_UNSUPPORTED_CALLS[module, name]} are not supported; save "
                               "plain dense tensors (a state_dict())")
    if found is None or not m.tensors:
        raise m.unsafe(f"references {shorten(module)}.{shorten(name)}")
    m.push(found)


def _text_global(m: PickleMachine) -> None:
    module = str(m.read_line(), "utf-8")
    _global(m, module, str(m.read_line(), "utf-8"))


def _stack_global(m: PickleMachine) -> None:
    name = m.pop()
    _global(m, m.pop(), name)


def _instantiate(m: PickleMachine, op: str, cls) -> None:
    raise m.unsafe(f"instantiates {shorten(cls) if isinstance(cls, str) else kind(cls)} with {op}")


def _inst(m: PickleMachine) -> None:
    module = str(m.read_line(), "utf-8")
    _instantiate(m, "INST", f"{module}.{str(m.read_line(), 'utf-8')}")


def _reduce(m: PickleMachine) -> None:
    args = m.pop()
    func = m.top()
    if not (isinstance(func, Global) and func.kind == "callable"):
        raise m.corrupt(f"REDUCE calls {kind(func)}, not an allowed function")
    if type(args) is not tuple:
        raise m.corrupt(f"the arguments of {func} are {kind(args)}, not a tuple")
    m.stack[-1] = _CALLS[func.name](m, func, args)


def _build(m: PickleMachine) -> None:
    state = m.pop()
    target = m.top()
    if type(target) is not collections.OrderedDict or type(state) is not dict:
        raise m.corrupt(f"BUILD sets the state of {kind(target)} to {kind(state)}: only an OrderedDict's "
                        "metadata may be set")
    # The state is a state dict's `_metadata` (module versions); nothing reads it, so it is dropped.


def _persistent_id(m: PickleMachine) -> None:
    pid = m.pop()
    if not m.tensors:
        raise m.corrupt("a persistent id outside the checkpoint's main pickle")
    m.push(_storage_ref(m, pid))


def _storage_ref(m: PickleMachine, pid) -> StorageRef:
    shape = "('storage', storage type, key, location, size[, view])"
    if type(pid) is not tuple or len(pid) not in (5, 6) or type(pid[0]) is not str or pid[0] != "storage":
        raise m.corrupt(f"a persistent id is {kind(pid)} of another shape than {shape}")
    _, storage_type, key, location, numel = pid[:5]
    view = pid[5] if len(pid) == 6 else None
    if not (isinstance(storage_type, Global) and storage_type.kind == "storage") or type(key) is not str \
            or type(location) is not str or not _ints((numel,)):
        raise m.corrupt(f"a persistent id holds {kind(storage_type)}, {kind(key)}, {kind(location)} and "
                        f"{kind(numel)} where {shape} belongs")
    if view is not None and not (type(view) is tuple and len(view) == 3 and type(view[0]) is str
                                 and _ints(view[1:])):
        raise m.corrupt(f"a storage view is {kind(view)}, not (key, offset, size)")
    ref = StorageRef(key, storage_type.dtype, numel, view and (view[0], view[1], view[2]))
    known = m.storages.setdefault(key, ref)
    if (known.dtype, known.numel) != (ref.dtype, ref.numel):
        raise m.corrupt(f"storage {shorten(key)!r} is declared as {known.numel} {known.dtype} and as {ref.numel} "
                        f"{ref.dtype}")
    return ref


def _proto(m: PickleMachine) -> None:
    protocol = m.read_uint(1)
    if protocol > MAX_PROTOCOL:
        raise m.corrupt(f"pickle protocol {protocol} is newer than any Python writes ({MAX_PROTOCOL})")


_CALL_OPS = {
    "GLOBAL": _text_global,
    "STACK_GLOBAL": _stack_global,
    "REDUCE": _reduce,
    "BUILD": _build,
    "BINPERSID": _persistent_id,
    "INST": _inst,
    "OBJ": lambda m: _instantiate(m, "OBJ", (m.pop_mark() or [None])[0]),
    "NEWOBJ": lambda m: _instantiate(m, "NEWOBJ", m.stack[-2] if len(m.stack) > 1 else None),
    "NEWOBJ_EX": lambda m: _instantiate(m, "NEWOBJ_EX", m.stack[-3] if len(m.stack) > 2 else None),
    "EXT1": lambda m: _instantiate(m, "EXT1", "an extension-registry entry"),
    "EXT2": lambda m: _instantiate(m, "EXT2", "an extension-registry entry"),
    "EXT4": lambda m: _instantiate(m, "EXT4", "an extension-registry entry"),
    "PROTO": _proto,
    "FRAME": lambda m: m.read(8),  # a length hint for buffered readers: the whole pickle is in memory
}


# -- the allowed functions, as what they would return
def _ordered_dict(m: PickleMachine, func: Global, args: tuple):
    if args:
        raise m.corrupt(f"{func} is called with arguments; torch pickles it empty and fills it with SETITEMS")
    return collections.OrderedDict()


def _size(m: PickleMachine, func: Global, args: tuple):
    if len(args) != 1 or not _ints(args[0]):
        raise m.corrupt(f"{func} takes one tuple of sizes, not {len(args)} argument(s)")
    return args[0]


def _encode(m: PickleMachine, func: Global, args: tuple):
    """Protocol 2's bytes: _codecs.encode(text, 'latin1')."""
    if len(args) != 2 or type(args[0]) is not str or args[1] not in ("latin1", "latin-1"):
        raise m.corrupt(f"{func} is called with other arguments than (text, 'latin1')")
    m.budget.charge(len(args[0]), m.what)
    return args[0].encode("latin-1")


def _parameter(m: PickleMachine, func: Global, args: tuple):
    arity = 4 if func.name.endswith("_with_state") else 3
    if len(args) != arity or not isinstance(args[0], TensorRef):
        raise m.corrupt(f"{func} takes a tensor and {arity - 1} more arguments")
    return args[0]


def _tensor(m: PickleMachine, func: Global, args: tuple):
    low, high = _TENSOR_ARITY[func.name]
    if not low <= len(args) <= high:
        raise m.corrupt(f"{func} takes {low} to {high} arguments, not {len(args)}")
    storage, offset, size, stride = args[:4]
    if not isinstance(storage, StorageRef):
        raise m.corrupt(f"{func} is given {kind(storage)} where a storage belongs")
    dtype = storage.dtype
    if func.name == "_rebuild_tensor_v3":  # an untyped storage, viewed as the dtype named here
        if not (isinstance(args[6], Global) and args[6].kind == "dtype"):
            raise m.corrupt(f"{func} is given {kind(args[6])} where a dtype belongs")
        dtype = args[6].dtype
    return TensorRef(storage, offset, size, stride, dtype)


_CALLS = {"OrderedDict": _ordered_dict, "Size": _size, "encode": _encode, "_rebuild_parameter": _parameter,
          "_rebuild_parameter_with_state": _parameter, **{name: _tensor for name in _TENSOR_ARITY}}
_NAMED_OPS = {**_DATA_OPS, **_CONTAINER_OPS, **_CALL_OPS}
_HANDLERS = {code: _NAMED_OPS[name] for code, name in _OPNAMES.items() if name in _NAMED_OPS}
