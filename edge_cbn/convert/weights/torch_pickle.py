"""Read PyTorch checkpoints (`.pth`) without torch, safely.

Both formats torch writes are supported: the zip archive (torch >= 1.6: `archive/data.pkl` plus one raw
file per storage under `archive/data/`) and the legacy stream (magic number, protocol, sys info, the
pickle, the storage keys, then each storage as an int64 element count and raw bytes).

A pickle can call any importable function while it loads, so the unpickler here resolves only the tensor
rebuild path and plain containers; any other global is refused before anything runs.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np


class UnsafeCheckpoint(pickle.UnpicklingError):
    """The checkpoint's pickle references a global outside the allowed tensor-rebuild set."""


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor(_v2): a strided view into a flat storage, copied out."""
    size, stride = tuple(size), tuple(stride)
    if not size:
        return np.array(storage[offset])
    needed = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if needed > storage.size:
        raise ValueError(f"tensor view of size {size} runs past its storage ({storage.size} elements)")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride])
    return np.array(view)


def _rebuild_parameter(data, *_ignored):
    return data


_REBUILD_TENSOR = {("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2")}
_ALLOWED = {
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage=None, rebuild=_rebuild_tensor):
        super().__init__(file)
        self._load_storage = load_storage
        self._rebuild = rebuild

    def find_class(self, module, name):
        if (module, name) in _REBUILD_TENSOR:
            return self._rebuild
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpoint(f"refusing to load: the checkpoint references {module}.{name}, which is not "
                               "part of a plain tensor state dict (only tensors and containers are allowed)")

    def persistent_load(self, pid):
        if self._load_storage is None or not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpoint(f"refusing to load: unexpected persistent id {pid!r}")
        return self._load_storage(*pid[1:])


def _load_zip(path) -> object:
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a torch zip checkpoint (no single data.pkl)")
        root = pkl[0][: -len("data.pkl")]
        cache: dict = {}

        def load_storage(storage_type, key, _location, numel, *_view):
            if key not in cache:
                raw = zf.read(f"{root}data/{key}")
                cache[key] = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
                if cache[key].size < numel:
                    raise ValueError(f"{path}: storage {key} is truncated")
            return cache[key]

        return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _load_legacy(path) -> object:
    with open(path, "rb") as f:
        magic = _RestrictedUnpickler(f).load()
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch checkpoint (bad magic number)")
        _RestrictedUnpickler(f).load()  # protocol version
        _RestrictedUnpickler(f).load()  # sys info
        types: dict = {}

        def load_storage(storage_type, root_key, _location, _numel, view_metadata=None):
            types[root_key] = storage_type
            return _Deferred(root_key, view_metadata)

        # Tensors reference storages whose bytes follow the pickle: rebuild them once those are read.
        result = _RestrictedUnpickler(f, load_storage, _DeferredTensor).load()
        keys = _RestrictedUnpickler(f).load()
        storages = {}
        for key in keys:
            (count,) = struct.unpack("<q", f.read(8))
            dtype = types[key].dtype
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise ValueError(f"{path}: truncated storage {key}")
            storages[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    return _resolve(result, storages)


class _Deferred:
    """A legacy storage whose bytes come after the pickle; tensors on it are resolved at the end."""

    def __init__(self, key, view):
        self.key, self.view = key, view


class _DeferredTensor:
    def __init__(self, storage, *args):
        self.storage, self.args = storage, args


def _resolve(obj, storages):
    if isinstance(obj, _DeferredTensor):
        flat = storages[obj.storage.key]
        if obj.storage.view is not None:
            _, offset, size = obj.storage.view
            flat = flat[offset:offset + size]
        return _rebuild_tensor(flat, *obj.args)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, storages)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, storages) for v in obj)
    return obj


def load(path) -> dict:
    """Load a `.pth` checkpoint as {name: numpy array}.  A wrapped checkpoint ({'state_dict': …} or
    {'model': …}) is unwrapped.  Raises UnsafeCheckpoint for anything but tensors and containers."""
    path = str(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise FileNotFoundError(f"weight file {path!r} cannot be read: {e.strerror}") from None
    try:
        obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except UnsafeCheckpoint:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
