"""Darknet `.weights` files: a header, then every conv layer's floats in cfg order, nothing else.

Header: major, minor, revision (int32), then `seen` (images trained on) as int64 when
major*10+minor >= 2, else int32.  Per conv layer: with batchnorm `beta, gamma, mean, var` (n floats each),
without it `bias` (n floats); then the kernel, OIHW.  The file carries no names or shapes, so a model fits a
file only when the float counts match exactly; anything else is refused with `WeightMismatch`.

Model layers are `conv_{i}` (+ `bn_{i}` when batch-normalised), `i` the cfg layer index."""
from __future__ import annotations

import re

import numpy as np

from .assign import WeightMismatch, keras_to_torch, torch_to_keras

_CONV_NAME = re.compile(r"conv_(\d+)$")


def _seen_dtype(major: int, minor: int):
    return np.int64 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else np.int32


def load_darknet(path) -> tuple[dict, np.ndarray]:
    """(header dict with major/minor/revision/seen, all the floats after it as one float32 array)."""
    raw = open(path, "rb").read()
    if len(raw) < 16:
        raise WeightMismatch(f"{path}: {len(raw)} bytes is too short for a darknet weights header")
    major, minor, revision = (int(v) for v in np.frombuffer(raw, "<i4", 3))
    seen_dtype = np.dtype(_seen_dtype(major, minor)).newbyteorder("<")
    seen = int(np.frombuffer(raw, seen_dtype, 1, offset=12)[0])
    body = raw[12 + seen_dtype.itemsize:]
    if len(body) % 4:
        raise WeightMismatch(f"{path}: {len(body)} bytes after the header is not a whole number of floats")
    header = {"major": major, "minor": minor, "revision": revision, "seen": seen}
    return header, np.frombuffer(body, "<f4").astype(np.float32)


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
    pre = [f"{bn.name}.{k}" for k in ("beta", "gamma", "mean", "var")] if bn is not None else [f"{conv.name}.bias"]
    oihw = keras_to_torch("conv", np.empty(conv.kernel.shape, np.float32)).shape
    return [(name, (n,)) for name in pre] + [(f"{conv.name}.kernel", tuple(oihw))]


def assign_darknet(model, path) -> dict:
    """Fill `model` from a darknet weights file; returns the header.  Nothing is changed unless the
    file fits the model exactly."""
    header, data = load_darknet(path)
    layers = darknet_convs(model)
    tensors, off = {}, 0
    for conv, bn in layers:
        for name, shape in _file_tensors(conv, bn):
            n = int(np.prod(shape))
            if off + n > data.size:
                raise WeightMismatch(
                    f"{path}: the file ends inside tensor {name!r} (needs {n} floats at float {off}, only "
                    f"{data.size - off} left) — the file is truncated or for a smaller model/num_classes")
            tensors[name] = data[off:off + n].reshape(shape)
            off += n
    if off != data.size:
        raise WeightMismatch(
            f"{path}: {data.size - off} floats left over after the last layer {layers[-1][0].name!r} "
            f"(model uses {off}) — the file is for a larger model or a different num_classes")
    for conv, bn in layers:
        kernel = torch_to_keras("conv", tensors[f"{conv.name}.kernel"])
        if bn is None:
            conv.set_weights([kernel, tensors[f"{conv.name}.bias"]])
        else:
            conv.set_weights([kernel])
            bn.set_weights([tensors[f"{bn.name}.{k}"] for k in ("gamma", "beta", "mean", "var")])
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
