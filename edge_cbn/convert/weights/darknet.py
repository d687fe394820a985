"""Darknet `.weights` files: a header, then every conv layer's floats in cfg order, nothing else.

Header: major, minor, revision (int32), then `seen` (images trained on) as int64 when
major*10+minor >= 2, else int32.  Per conv layer: with batchnorm `beta, gamma, mean, var` (n floats each),
without it `bias` (n floats); then the kernel, OIHW.  The file carries no names or shapes, so a model fits a
file only when the float counts match exactly; anything else is refused with `MismatchedWeightFile` (a
BadInput and a WeightMismatch) naming the tensor where the file ends or how many floats are left over.

Bounds: the header must carry a darknet version (each part below 1000), the body a whole number of
float32s; the fit is checked from the file's size before its floats are read (one array, the body's size);
every tensor must be finite and every BN variance >= 0 (`checks.check_values`).  Every failure is one
BadInput line naming the file.

Model layers are `conv_{i}` (+ `bn_{i}` when batch-normalised), `i` the cfg layer index."""
from __future__ import annotations

import os
import re

import numpy as np

from ...runtime.errors import BadInput
from .assign import keras_to_torch, torch_to_keras
from .checks import MismatchedWeightFile, check_values

_CONV_NAME = re.compile(r"conv_(\d+)$")
_BN_KEYS = ("beta", "gamma", "mean", "var")  # file order
MAX_VERSION = 1000


def _seen_dtype(major: int, minor: int):
    return np.int64 if major * 10 + minor >= 2 and major < MAX_VERSION and minor < MAX_VERSION else np.int32


def _read_header(path, f) -> tuple[dict, int]:
    """(header dict, number of float32s after it) of the open file `f`, left at the first float."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(12)
    if len(head) < 12:
        raise BadInput(path, f"{size} bytes is too short for a darknet weights header")
    major, minor, revision = (int(v) for v in np.frombuffer(head, "<i4"))
    if not all(0 <= v < MAX_VERSION for v in (major, minor, revision)):
        raise BadInput(path, f"header version {major}.{minor}.{revision} is no darknet version: not a .weights "
                             "file, or a corrupt one")
    seen_dtype = np.dtype(_seen_dtype(major, minor)).newbyteorder("<")
    raw_seen = f.read(seen_dtype.itemsize)
    if len(raw_seen) < seen_dtype.itemsize:
        raise BadInput(path, f"{size} bytes is too short for a darknet weights header")
    body = size - 12 - seen_dtype.itemsize
    if body % 4:
        raise BadInput(path, f"{body} bytes after the header is not a whole number of floats: the file is "
                             "truncated or corrupt")
    seen = int(np.frombuffer(raw_seen, seen_dtype)[0])
    return {"major": major, "minor": minor, "revision": revision, "seen": seen}, body // 4


def _read_floats(path, f, count: int) -> np.ndarray:
    floats = np.empty(count, "<f4")
    if f.readinto(memoryview(floats).cast("B")) != floats.nbytes:
        raise BadInput(path, "changed size while being read")
    return floats.astype(np.float32, copy=False)


def _open(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise BadInput(path, f"cannot be read: {e.strerror or e}") from None


def load_darknet(path) -> tuple[dict, np.ndarray]:
    """(header dict with major/minor/revision/seen, all the floats after it as one float32 array)."""
    with _open(path) as f:
        header, count = _read_header(path, f)
        return header, _read_floats(path, f, count)


def read_darknet(path, layout: list[tuple[str, tuple]]) -> tuple[dict, dict]:
    """(header, {name: array}) for the tensors `layout` lists in file order as (name, shape), once the
    file is known to hold exactly their floats, all finite, BN variances (`*.var`) >= 0."""
    with _open(path) as f:
        header, count = _read_header(path, f)
        offsets = _fit(path, count, layout)
        floats = _read_floats(path, f, count)
    tensors = {}
    for (name, shape), start in zip(layout, offsets):
        tensors[name] = floats[start:start + int(np.prod(shape))].reshape(shape)
        check_values(path, name, tensors[name], variance=name.endswith(".var"))
    return header, tensors


def _fit(path, count: int, layout: list[tuple[str, tuple]]) -> list[int]:
    """Where each tensor starts among the file's `count` floats; MismatchedWeightFile unless they fit."""
    offsets, off = [], 0
    for name, shape in layout:
        n = int(np.prod(shape))
        if off + n > count:
            raise MismatchedWeightFile(
                path, f"the file ends inside tensor {name!r} (needs {n} floats at float {off}, only {count - off} "
                      "left) — the file is truncated or for a smaller model/num_classes")
        offsets.append(off)
        off += n
    if off != count:
        last = repr(layout[-1][0]) if layout else "(none)"
        raise MismatchedWeightFile(
            path, f"{count - off} floats left over after the last tensor {last} (model uses {off}) — the file "
                  "is for a larger model or a different num_classes")
    return offsets


def darknet_convs(model) -> list:
    """[(conv layer, its bn layer or None)] in cfg order."""
    convs = sorted((int(m.group(1)), layer) for layer in model.layers if (m := _CONV_NAME.match(layer.name)))
    if not convs:
        raise ValueError(f"model {model.name!r} has no conv_<i> layers: not a darknet model")
    names = {layer.name for layer in model.layers}
    return [(conv, model.get_layer(f"bn_{i}") if f"bn_{i}" in names else None) for i, conv in convs]


def _file_tensors(conv, bn) -> list[tuple[str, tuple]]:
    """(name, shape) of this layer's tensors in file order."""
    n = conv.filters
    pre = [f"{bn.name}.{k}" for k in _BN_KEYS] if bn is not None else [f"{conv.name}.bias"]
    oihw = keras_to_torch("conv", np.empty(conv.kernel.shape, np.float32)).shape
    return [(name, (n,)) for name in pre] + [(f"{conv.name}.kernel", tuple(oihw))]


def assign_darknet(model, path) -> dict:
    """Fill `model` from a darknet weights file; returns the header.  Nothing is changed unless the
    file fits the model exactly and every value is usable."""
    layers = darknet_convs(model)
    header, tensors = read_darknet(path, [t for conv, bn in layers for t in _file_tensors(conv, bn)])
    for conv, bn in layers:
        kernel = torch_to_keras("conv", tensors[f"{conv.name}.kernel"])
        if bn is None:
            conv.set_weights([kernel, tensors[f"{conv.name}.bias"]])
        else:
            conv.set_weights([kernel])
            gamma, beta, mean, var = (tensors[f"{bn.name}.{k}"] for k in ("gamma", "beta", "mean", "var"))
            bn.set_weights([gamma, beta, mean, var])
    return header


def save_darknet(model, path, *, version=(0, 2, 0), seen: int = 0) -> None:
    """Write `model`'s conv/BN weights as a darknet weights file (header `version`)."""
    major, minor, revision = version
    parts = []
    for conv, bn in darknet_convs(model):
        if bn is None:
            kernel, bias = conv.get_weights()
            parts.append(bias)
        else:
            (kernel,) = conv.get_weights()
            gamma, beta, mean, var = bn.get_weights()
            parts += [beta, gamma, mean, var]
        parts.append(keras_to_torch("conv", kernel))
    with open(path, "wb") as f:
        f.write(np.array([major, minor, revision], "<i4").tobytes())
        f.write(np.array([seen], np.dtype(_seen_dtype(major, minor)).newbyteorder("<")).tobytes())
        f.write(np.concatenate([np.ravel(p) for p in parts]).astype("<f4").tobytes())
