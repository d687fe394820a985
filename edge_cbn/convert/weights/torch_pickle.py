"""Read PyTorch checkpoints (`.pth`) without torch, as read-only numpy arrays, safely.

Both formats torch writes are read: the zip archive (torch >= 1.6: `<root>/data.pkl` plus one raw file
per storage under `<root>/data/`) and the legacy stream (magic number, protocol, sys info, the pickle,
the storage keys, then each storage as an int64 element count and its bytes).  The pickle runs on
`pickle_machine.PickleMachine`, which calls nothing (see there).  What is bounded, and how; a broken
bound is one `BadInput` line naming the file:

- Memory: one `Budget` per load, `ALLOC_FACTOR`x the file's size + 16 MB + `expected_bytes` (the model's
  parameter bytes, when the caller knows them).  It is charged for everything the load allocates or
  hands out: zipfile's member list (`ZIP_DIRECTORY_FACTOR` bytes per byte of central directory, charged
  before zipfile parses it), every member's declared size before a byte of it is inflated (then read in
  1 MiB chunks, so a zip bomb fails at once and a member longer than declared fails its CRC), the legacy
  file itself, 64 bytes per pickle opcode and every string, bfloat16 -> float32 copies, and every
  tensor's logical bytes -- which bounds what the finiteness check and a caller's copy cost, so neither
  stride 0 nor thousands of views of one storage amplify.  A genuine checkpoint needs about 2x its size
  (bfloat16 ones 5x: their float32 copy, and views of it, count double).
- Time: linear in the file's size; the pickle is read once and memo references are shared, not expanded.
- Tensors: sizes, strides and the offset are integers in [0, 2^62]; stride 0 is allowed (torch writes it
  for expanded views; the logical bytes are charged) and a stride of a dimension of size <= 1 is never
  used.  The last element offset + sum((size - 1) * stride) must lie inside the storage before a view is
  made.  Views share one array per storage, read-only; nothing is copied per tensor.
- Values: floating tensors must be finite and `running_var`s >= 0 (`checks.check_values`).

How this compares: torch's `weights_only` unpickler (torch/_weights_only_unpickler.py) has the same kind
of allowlist (rebuild functions, storages, OrderedDict; BUILD only on Tensor/Parameter/OrderedDict,
APPEND only on lists, SETITEM only on dicts; protocol-2 opcodes only) and checks a view's extent in C++
when it makes the tensor, but does not bound the objects a pickle builds: opcode spam or a memo DAG is
limited only by the machine's memory.  safetensors has no pickle: a header of at most
100 MB, and tensors must tile the buffer exactly (shape x dtype == byte range, with overflow checks), so
it has no strides and no sharing.  This reader keeps what torch files use (strides, views, shared
storages) and counts everything they cost.
"""
from __future__ import annotations

import contextlib
import os
import stat
import zipfile
import zlib

import numpy as np

from ...runtime.errors import BadInput
from .checks import check_values
from .pickle_machine import (DTYPES, MAX_COUNT, Budget, PickleMachine, StorageRef, TensorRef, UnsafeCheckpoint,
                             kind, shorten)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ALLOC_FACTOR = 8
SLACK_BYTES = 16 << 20
ZIP_DIRECTORY_FACTOR = 12  # bytes of zipfile's records per byte of central directory (measured: 4.7 to 9.7)
CHUNK_BYTES = 1 << 20
MAX_DIMS = 32
_HEAD_BYTES = 512

__all__ = ["load", "UnsafeCheckpoint", "LEGACY_MAGIC"]


def load(path, expected_bytes: int | None = None) -> dict[str, np.ndarray]:
    """{name: read-only array} of the tensors of the `.pth` at `path`, bfloat16 as float32.  A wrapped
    checkpoint ({'state_dict': ...} or {'model': ...}) is unwrapped; entries that are not tensors are
    dropped.  Anything unusable raises BadInput (UnsafeCheckpoint for a pickle that asks to run code)."""
    path = str(path)
    size, head = _size_and_head(path)
    extra = max(0, int(expected_bytes or 0))
    budget = Budget(path, ALLOC_FACTOR * size + SLACK_BYTES + extra,
                    f"{ALLOC_FACTOR}x the file's size + 16 MB" + (" + the model's parameter bytes" if extra else ""))
    reader = _read_zip if _format(path, head) == "zip" else _read_legacy
    state, storages = reader(path, size, budget)
    return _tensors(path, state, _StorageArrays(path, storages, budget), budget)


# -- the file
def _size_and_head(path: str) -> tuple[int, bytes]:
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise BadInput(path, "not a regular file")
            return info.st_size, f.read(_HEAD_BYTES)
    except OSError as e:
        raise BadInput(path, f"cannot be read: {e.strerror or e}") from None


def _format(path: str, head: bytes) -> str:
    """'zip' or 'legacy' from the first bytes, or a refusal saying what the file looks like instead."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80":
        return "legacy"
    if not head:
        what = "an empty file"
    elif head.lstrip()[:1] == b"<":
        what = "an HTML or XML page (a failed download?)"
    elif head[8:9] == b"{":
        what = "a safetensors file (`load_weights` reads it: safetensors_file)"
    elif head[257:262] == b"ustar":
        what = "a tar archive (torch < 0.4's format, unsupported)"
    elif head[:2] == b"\x1f\x8b":
        what = "a gzip file"
    else:
        what = f"a file starting with bytes {head[:8].hex()}"
    raise BadInput(path, f"not a torch checkpoint: {what}, neither a zip archive nor a pickle")


def _read_file(path: str, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except OSError as e:
        raise BadInput(path, f"cannot be read: {e.strerror or e}") from None
    if len(data) != size:
        raise BadInput(path, "changed size while being read")
    return data


def _state_dict(path: str, obj) -> dict:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise BadInput(path, f"the checkpoint holds {kind(obj)}, not a state dict")
    return obj


# -- the zip format
@contextlib.contextmanager
def _zip_errors(path: str, what: str):
    """zipfile's and zlib's exceptions about a damaged archive as one BadInput line."""
    try:
        yield
    except EOFError:
        raise BadInput(path, f"{what} ends early: the file is truncated") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, RuntimeError, OSError,
            ValueError) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(path, f"{what} is damaged ({shorten(e, 120)}): not a valid torch checkpoint") from None


def _read_zip(path: str, size: int, budget: Budget) -> tuple[dict, dict]:
    with _zip_errors(path, "the zip archive"), open(path, "rb") as f:
        end = zipfile._EndRecData(f)  # the end record ZipFile itself starts from (stable since Python 2)
    if end is None:
        raise BadInput(path, "a zip archive without its end record: the file is truncated or damaged, not a "
                             "complete torch checkpoint")
    budget.charge(ZIP_DIRECTORY_FACTOR * end[zipfile._ECD_SIZE], "the zip archive's directory")
    with _zip_errors(path, "the zip archive"):
        archive = zipfile.ZipFile(path)
    with archive:
        root = _archive_root(path, archive)
        _check_byteorder(path, archive, root, budget)
        pickle_name = f"{root}data.pkl"
        obj, _ = PickleMachine(path, budget, _read_member(path, archive, pickle_name, budget),
                               what=pickle_name).run()
        state = _state_dict(path, obj)
        needed = {v.storage.key: v.storage for v in state.values() if isinstance(v, TensorRef)}
        storages = {key: _read_member(path, archive, f"{root}data/{key}", budget, _storage_bytes(ref))
                    for key, ref in needed.items()}
    return state, storages


def _archive_root(path: str, archive: zipfile.ZipFile) -> str:
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise BadInput(path, f"a zip archive with {len(pickles)} data.pkl files: not a torch checkpoint")
    return pickles[0][: -len("data.pkl")]


def _check_byteorder(path: str, archive: zipfile.ZipFile, root: str, budget: Budget) -> None:
    name = f"{root}byteorder"  # absent from archives older than torch 1.10: those are little-endian
    if name in archive.NameToInfo:
        order = bytes(_read_member(path, archive, name, budget))
        if order != b"little":
            raise BadInput(path, f"written with byte order {shorten(order.decode('latin-1'))}; only little-endian "
                                 "checkpoints are supported")


def _read_member(path: str, archive: zipfile.ZipFile, name: str, budget: Budget, expected: int | None = None):
    """The member's bytes (a bytearray), its declared size checked and charged before it is inflated."""
    info = archive.NameToInfo.get(name)
    if info is None:
        raise BadInput(path, f"the archive has no {shorten(name)}: not a complete torch checkpoint")
    if info.flag_bits & 0x1:
        raise BadInput(path, f"{shorten(name)} is encrypted; torch never encrypts checkpoints")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise BadInput(path, f"{shorten(name)} is compressed with method {info.compress_type}; torch stores "
                             "members uncompressed")
    if expected is not None and info.file_size != expected:
        raise BadInput(path, f"{shorten(name)} holds {info.file_size} bytes, its storage needs {expected}: the "
                             "file is corrupt")
    budget.charge(info.file_size, shorten(name))
    data = bytearray(info.file_size)
    with _zip_errors(path, shorten(name)), archive.open(info) as member:
        view, got = memoryview(data), 0
        while got < len(data):
            n = member.readinto(view[got:got + CHUNK_BYTES])
            if not n:
                raise BadInput(path, f"{shorten(name)} ends after {got} of its {len(data)} bytes: the file is "
                                     "truncated")
            got += n
    return data


# -- the legacy format
def _read_legacy(path: str, size: int, budget: Budget) -> tuple[dict, dict]:
    budget.charge(size, "the file")
    data = _read_file(path, size)
    pos = _legacy_header(path, data, budget)
    machine = PickleMachine(path, budget, data, pos)
    obj, pos = machine.run()
    keys, pos = PickleMachine(path, budget, data, pos, what="the storage key list", tensors=False).run()
    return _state_dict(path, obj), _legacy_storages(path, data, pos, keys, machine.storages)


def _legacy_header(path: str, data: bytes, budget: Budget) -> int:
    """Check the magic number, protocol version and byte order; the position of the main pickle."""
    def header_pickle(pos):
        return PickleMachine(path, budget, data, pos, what="the header", tensors=False).run()

    magic, pos = header_pickle(0)
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise BadInput(path, "a pickle without torch's magic number: not a torch checkpoint")
    protocol, pos = header_pickle(pos)
    if type(protocol) is not int or protocol != LEGACY_PROTOCOL:
        raise BadInput(path, f"legacy format version {shorten(protocol) if type(protocol) is int else kind(protocol)}"
                             f", not {LEGACY_PROTOCOL}: unsupported or corrupt")
    sys_info, pos = header_pickle(pos)
    if type(sys_info) is dict and sys_info.get("little_endian") is False:
        raise BadInput(path, "written on a big-endian machine; only little-endian checkpoints are supported")
    return pos


def _legacy_storages(path: str, data: bytes, pos: int, keys, refs: dict) -> dict:
    """{key: the storage's bytes}, read-only views into `data`: each an int64 element count, then bytes."""
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise BadInput(path, f"the storage key list is {kind(keys)} of other things than strings: corrupt")
    storages = {}
    for key in keys:
        ref = refs.get(key)
        if ref is None or key in storages:
            raise BadInput(path, f"storage {shorten(key)!r} follows the pickle "
                                 f"{'twice' if ref else 'but no tensor declared it'}: the file is corrupt")
        if pos + 8 > len(data):
            raise BadInput(path, f"the file ends before storage {shorten(key)!r}: it is truncated")
        count = int.from_bytes(data[pos:pos + 8], "little", signed=True)
        if count != ref.numel:
            raise BadInput(path, f"storage {shorten(key)!r} holds {count} elements, the pickle declared {ref.numel}: "
                                 "the file is corrupt")
        nbytes = _storage_bytes(ref)
        if pos + 8 + nbytes > len(data):
            raise BadInput(path, f"storage {shorten(key)!r} needs {nbytes} bytes, {len(data) - pos - 8} are left: the "
                                 "file is truncated")
        storages[key] = np.frombuffer(data, np.uint8, nbytes, pos + 8)
        pos += 8 + nbytes
    return storages


# -- storages and tensors
def _storage_bytes(ref: StorageRef) -> int:
    return ref.numel * np.dtype(DTYPES[ref.dtype]).itemsize


class _StorageArrays:
    """One flat read-only array per storage and dtype, over the storage's bytes (bfloat16: widened once to
    float32); every tensor on that storage is a view of it."""

    def __init__(self, path: str, storages: dict, budget: Budget):
        self.path, self.storages, self.budget, self.cache = path, storages, budget, {}

    def flat(self, ref: StorageRef, dtype: str) -> np.ndarray:
        if (ref.key, dtype) not in self.cache:
            self.cache[ref.key, dtype] = self._convert(ref.key, dtype)
        flat = self.cache[ref.key, dtype]
        if ref.view is None:
            return flat
        _, offset, size = ref.view
        if dtype != ref.dtype or offset + size > flat.size:
            raise BadInput(self.path, f"a view of storage {shorten(ref.key)!r} ({size} elements at {offset}) does not "
                                      f"fit in its {flat.size} {ref.dtype} elements")
        return flat[offset:offset + size]

    def _convert(self, key: str, dtype: str) -> np.ndarray:
        raw = self.storages.get(key)
        if raw is None:
            raise BadInput(self.path, f"storage {shorten(key)!r} has no data in the file: it is truncated or corrupt")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        if len(raw) % itemsize:
            raise BadInput(self.path, f"storage {shorten(key)!r} holds {len(raw)} bytes, not a whole number of {dtype}")
        flat = np.frombuffer(raw, DTYPES[dtype])
        if dtype == "bfloat16":  # the high half of a float32
            self.budget.charge(2 * len(raw), f"storage {shorten(key)!r} as float32")
            flat = np.left_shift(flat.astype(np.uint32), 16).view(np.float32)
        flat.flags.writeable = False
        return flat


def _tensors(path: str, state: dict, arrays: _StorageArrays, budget: Budget) -> dict[str, np.ndarray]:
    out = {}
    for name, ref in state.items():
        if not isinstance(ref, TensorRef):
            continue
        if type(name) is not str:
            raise BadInput(path, f"a tensor is named by {kind(name)} ({shorten(name)}), not a string")
        out[name] = _tensor_view(path, name, ref, arrays, budget)
        check_values(path, name, out[name], variance=name.endswith("running_var"))
    if not out:
        raise BadInput(path, "the checkpoint holds no tensors")
    return out


def _tensor_view(path: str, name: str, ref: TensorRef, arrays: _StorageArrays, budget: Budget) -> np.ndarray:
    """A read-only view of the tensor's elements in its storage, its extent checked first."""
    size, stride, offset = _layout(path, name, ref)
    itemsize = 4 if ref.dtype == "bfloat16" else np.dtype(DTYPES[ref.dtype]).itemsize
    logical = itemsize
    for n in size:
        logical *= max(n, 1)
    budget.charge(logical, f"tensor {shorten(name)!r}")
    flat = arrays.flat(ref.storage, ref.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= flat.size or offset > flat.size:
        raise BadInput(path, f"tensor {shorten(name)!r} (size {size}, stride {stride}, offset {offset}) reaches "
                             f"element {last} of a storage of {flat.size}: out of bounds")
    strides = tuple(s * flat.itemsize if n > 1 else 0 for n, s in zip(size, stride))
    return np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=strides, writeable=False)


def _layout(path: str, name: str, ref: TensorRef) -> tuple[tuple, tuple, int]:
    """(size, stride, offset), each an integer in [0, 2^62], as many strides as sizes, at most 32."""
    size, stride, offset = ref.size, ref.stride, ref.offset
    if type(size) not in (tuple, list) or type(stride) not in (tuple, list) or len(size) != len(stride) \
            or len(size) > MAX_DIMS:
        raise BadInput(path, f"tensor {shorten(name)!r} has a size ({kind(size)}) and stride ({kind(stride)}) that "
                             f"are not two tuples of the same length up to {MAX_DIMS}")
    values = (*size, *stride, offset)
    bad = [v for v in values if type(v) is not int or not 0 <= v <= MAX_COUNT]
    if bad:
        what = shorten(bad[0]) if type(bad[0]) is int else kind(bad[0])
        raise BadInput(path, f"tensor {shorten(name)!r} has {what} among its sizes, strides and offset; each must be "
                             "an integer from 0 to 2^62 (a negative or huge one would read outside its storage)")
    return tuple(size), tuple(stride), offset
