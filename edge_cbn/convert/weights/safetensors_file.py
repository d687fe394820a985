"""Read `.safetensors` weight files without torch, as read-only numpy arrays, bounded.

The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the tensors'
bytes, little-endian and C-ordered, at those offsets from the end of the header.  Everything is checked
against the file before a tensor is made, as the reference implementation checks it, and a broken check
is one `BadInput` line naming the file:

- the header length is at most `MAX_HEADER_BYTES` (100 MB, the reference's limit) and inside the file; the
  header is a JSON object, nested at most as deep as the format needs;
- every tensor has a known dtype, a shape of at most `MAX_DIMS` non-negative integers, and offsets that are
  integers with begin <= end; its byte range is exactly shape x dtype size (no overflow: Python integers);
- the byte ranges tile the data exactly, in order, without gap or overlap, and end at the end of the file;
- values: floating tensors finite and BN `running_var`s >= 0 (`checks.check_values`, as for `.pth`).

Memory: the file is mapped read-only and tensors are views of it (bfloat16 and float16 widened to float32,
a copy of their own size x 2), so a load costs what the tensors are, nothing a header can inflate."""
from __future__ import annotations

import json
import mmap
import os

import numpy as np

from ...runtime.errors import BadInput
from ...runtime.validation import regular_file
from .checks import check_values

MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 32
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "?"}

__all__ = ["load", "looks_like_safetensors"]


def looks_like_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes are a safetensors header: a length, then a JSON object."""
    return len(head) > 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES


def load(path) -> dict[str, np.ndarray]:
    """{name: read-only array} of the tensors of the `.safetensors` file at `path`, in the file's order
    (bfloat16 and float16 as float32).

    Raises:
        BadInput: the file cannot be read, or fails a check of the module docstring (naming which).
    """
    path = str(regular_file(path))
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if info.st_size < 8:
                raise BadInput(path, f"not a safetensors file: {info.st_size} bytes, shorter than its header length")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise BadInput(path, f"cannot be read: {e.strerror or e}") from None
    header, start = _header(path, data)
    entries = _entries(path, header, len(data) - start)
    return {name: _tensor(path, name, data, start, *entry) for name, entry in entries}


def _header(path: str, data) -> tuple[dict, int]:
    """The JSON header and the offset where the tensors' bytes start."""
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise BadInput(path, f"safetensors header of {n} bytes: more than the file's {len(data) - 8} "
                             f"or the format's limit of {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadInput(path, f"safetensors header is not valid JSON: {str(e)[:80]}") from None
    if not isinstance(header, dict):
        raise BadInput(path, f"safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInput(path, "safetensors __metadata__ must map names to strings")
    return header, 8 + n


def _entries(path: str, header: dict, data_bytes: int) -> list[tuple[str, tuple]]:
    """[(name, (dtype, shape, begin, end))] in file order, each entry checked and the ranges tiling the data."""
    entries = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise BadInput(path, f"tensor {name!r}: an entry needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise BadInput(path, f"tensor {name!r}: unknown dtype {str(dtype)[:20]!r}; expected one of {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_count(d) for d in shape)):
            raise BadInput(path, f"tensor {name!r}: shape {str(shape)[:60]} is not a list of at most {MAX_DIMS} "
                                 "non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))
                and offsets[0] <= offsets[1]):
            raise BadInput(path, f"tensor {name!r}: data_offsets {str(offsets)[:60]} are not [begin, end] with "
                                 "0 <= begin <= end")
        expected = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != expected:
            raise BadInput(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype} "
                                 f"({expected} bytes)")
        entries.append((name, (dtype, tuple(shape), offsets[0], offsets[1])))
    end = 0
    for name, (_, _, begin, stop) in sorted(entries, key=lambda e: (e[1][2], e[1][3])):
        if begin != end:
            raise BadInput(path, f"tensor {name!r} starts at byte {begin} of the data, expected {end}: "
                                 "tensors must tile the data without gap or overlap")
        end = stop
    if end != data_bytes:
        raise BadInput(path, f"the tensors cover {end} bytes of data, the file holds {data_bytes}")
    return entries


def _count(value) -> bool:
    return type(value) is int and value >= 0


def _tensor(path: str, name: str, data, start: int, dtype: str, shape: tuple, begin: int, end: int) -> np.ndarray:
    array = np.frombuffer(data, DTYPES[dtype], count=(end - begin) // np.dtype(DTYPES[dtype]).itemsize,
                          offset=start + begin).reshape(shape)
    if dtype == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    elif dtype == "F16":
        array = array.astype(np.float32)
    array.flags.writeable = False
    check_values(path, name, array, variance=name.endswith("running_var"))
    return array
