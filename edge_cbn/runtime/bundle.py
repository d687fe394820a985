"""An exported model on the device: `X.tflite` (BN-folded float32) + `X.cbn.npz` (re-fuse sidecar).

Device side: numpy + the `tflite` flatbuffer schema package only.  The sidecar format is specified in
docs/DESIGN.md; `write_sidecar` and `load_bundle` are its only writer and reader.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import tflite

from . import fold

FORMAT = 1
SIDECAR_SUFFIX = ".cbn.npz"
_BN_FIELDS = ("gamma", "beta", "mean", "var")
# Used when a .tflite comes without its sidecar: inference works, re-fuse does not.
DEFAULT_PREPROCESS = {"mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5], "letterbox": False}


@dataclasses.dataclass
class LayerRecord:
    """One conv/depthwise/dense layer: where its folded tensors live in the flatbuffer and the unfolded
    tensors (Keras layout) plus BN parameters (`bn` is None for a layer without BN)."""
    name: str
    kind: str  # "conv" | "depthwise" | "dense"
    bn: str | None
    eps: float | None
    w_buffer: int
    b_buffer: int | None
    kernel: np.ndarray | None = None
    bias: np.ndarray | None = None
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    mean: np.ndarray | None = None
    var: np.ndarray | None = None

    def meta(self) -> dict:
        return {"name": self.name, "kind": self.kind, "bn": self.bn, "eps": self.eps,
                "w_buffer": self.w_buffer, "b_buffer": self.b_buffer}


@dataclasses.dataclass
class Bundle:
    path: Path | None
    model_bytes: bytes
    meta: dict
    layers: list[LayerRecord]
    # TFLite-layout copies of the unfolded kernels, made once and shared (read-only) by every Refolder of
    # this bundle and of its calibration variant: one copy of the weights instead of one per model.
    _tflite_kernels: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def tflite_kernel(self, rec: "LayerRecord") -> np.ndarray:
        """`rec`'s unfolded kernel in TFLite layout, float32, read-only, shared."""
        kernel = self._tflite_kernels.get(rec.name)
        if kernel is None:
            kernel = np.ascontiguousarray(fold.to_tflite(rec.kind, np.asarray(rec.kernel, np.float32)))
            kernel.setflags(write=False)
            self._tflite_kernels[rec.name] = kernel
        return kernel

    @property
    def has_sidecar(self) -> bool:
        return bool(self.layers)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.meta["input_size"])

    @property
    def raw_input(self) -> bool:
        """True when the model takes RGB uint8 pixels and normalises them itself (meta "preprocess"
        then documents what the graph does); False for float32 input normalised beforehand."""
        return input_dtype(self.model_bytes) == np.uint8

    @property
    def can_calibrate(self) -> bool:
        return "calibration" in self.meta and self.path is not None

    def calibration_variant(self) -> "Bundle":
        """The calibration variant (same layers and arrays, its own file and buffer indices); its last
        output is the moments vector described in `edge_cbn.convert.export.moments_model`."""
        if not self.can_calibrate:
            raise FileNotFoundError(f"{self.path}: no calibration variant (re-export with tools/convert.py)")
        cal = self.meta["calibration"]
        path = self.path.with_name(cal["file"])
        layers = [dataclasses.replace(rec, w_buffer=cal["buffers"][rec.name][0],
                                      b_buffer=cal["buffers"][rec.name][1]) for rec in self.layers]
        return Bundle(path, path.read_bytes(), self.meta, layers, self._tflite_kernels)

    def layer(self, name: str) -> LayerRecord:
        for rec in self.layers:
            if rec.name == name or rec.bn == name:
                return rec
        raise KeyError(f"no layer or BN named {name!r} in the sidecar")


def calibration_path(tflite_path) -> Path:
    """`X.tflite` -> `X.calib.tflite`, the calibration variant with the BN moments output."""
    p = Path(tflite_path)
    stem = p.name[: -len(".tflite")] if p.name.endswith(".tflite") else p.name
    return p.with_name(stem + ".calib.tflite")


def sidecar_path(tflite_path) -> Path:
    """`X.tflite` -> `X.cbn.npz` (any other name gets the suffix appended)."""
    p = Path(tflite_path)
    stem = p.name[: -len(".tflite")] if p.name.endswith(".tflite") else p.name
    return p.with_name(stem + SIDECAR_SUFFIX)


def buffer_span(model_bytes, index: int, model=None) -> tuple[int, int]:
    """(byte offset, byte length) of buffer `index`'s data in the file; (0, 0) for an empty buffer.
    Handles both inline data (the usual case) and the `offset`/`size` fields of files over 2 GB."""
    model = model or tflite.Model.GetRootAs(model_bytes, 0)
    if not 0 <= index < model.BuffersLength():
        raise ValueError(f"buffer {index} does not exist (the model has {model.BuffersLength()})")
    buf = model.Buffers(index)
    if buf.Offset() > 1:  # data stored after the flatbuffer, offset relative to the file start
        start, size = buf.Offset(), buf.Size()
    else:
        field = buf._tab.Offset(4)
        if field == 0:
            return 0, 0
        start, size = buf._tab.Vector(field), buf._tab.VectorLen(field)
    if start + size > len(model_bytes):
        raise ValueError(f"buffer {index} lies outside the model data ({start}+{size} > {len(model_bytes)} "
                         "bytes): truncated or external-data .tflite, which re-fuse does not support")
    return start, size


def _input_tensor(model_bytes):
    sg = tflite.Model.GetRootAs(model_bytes, 0).Subgraphs(0)
    return sg.Tensors(int(sg.Inputs(0)))


def input_shape(model_bytes) -> tuple:
    """Shape of the model's (first) input tensor, e.g. (1, 224, 224, 3)."""
    return tuple(int(d) for d in _input_tensor(model_bytes).ShapeAsNumpy())


def input_dtype(model_bytes) -> np.dtype:
    """numpy dtype of the model's (first) input: uint8 for models that take RGB pixels as they are
    (edge-cbn's own exports normalise inside the graph), float32 for pre-normalised input."""
    types = {tflite.TensorType.FLOAT32: np.float32, tflite.TensorType.UINT8: np.uint8,
             tflite.TensorType.INT8: np.int8}
    code = _input_tensor(model_bytes).Type()
    if code not in types:
        raise ValueError(f"unsupported model input type {code} (expected float32, uint8 or int8)")
    return np.dtype(types[code])


def write_sidecar(path, meta: dict, layers: list[LayerRecord]) -> Path:
    """Write the sidecar atomically: `meta` (without "layers") + per-layer arrays."""
    meta = {**meta, "format": FORMAT, "layers": [rec.meta() for rec in layers]}
    arrays = {"meta": np.array(json.dumps(meta, default=_jsonable))}
    for rec in layers:
        arrays[f"{rec.name}/kernel"] = rec.kernel
        if rec.bias is not None:
            arrays[f"{rec.name}/bias"] = rec.bias
        for field in _BN_FIELDS if rec.bn else ():
            if getattr(rec, field) is not None:
                arrays[f"{rec.bn}/{field}"] = getattr(rec, field)
    arrays = {k: np.asarray(v, np.float32) if k != "meta" else v for k, v in arrays.items()}
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def _jsonable(x):
    if isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} in the sidecar meta is not JSON serialisable")


def atomic_write(path, write) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_sidecar(path) -> tuple[dict, list[LayerRecord]]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].item())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: sidecar format {meta.get('format')!r}, this edge-cbn reads {FORMAT}")

        def get(key):
            return z[key] if key in z.files else None

        layers = []
        for entry in meta["layers"]:
            rec = LayerRecord(**entry, kernel=get(f"{entry['name']}/kernel"), bias=get(f"{entry['name']}/bias"))
            if rec.bn:
                for field in _BN_FIELDS:
                    setattr(rec, field, get(f"{rec.bn}/{field}"))
                if rec.mean is None or rec.var is None:
                    raise ValueError(f"{path}: BN {rec.bn!r} has no mean/var arrays")
            if rec.kernel is None:
                raise ValueError(f"{path}: layer {rec.name!r} has no kernel array")
            layers.append(rec)
    return meta, layers


def load_bundle(tflite_path, *, require_sidecar: bool = False) -> Bundle:
    """Read `X.tflite` and its sidecar `X.cbn.npz`.  Without the sidecar the model still runs (as a
    classifier with [-1, 1] input scaling, with a warning) but cannot be re-fused; `require_sidecar`
    makes that an error."""
    path = Path(tflite_path)
    model_bytes = path.read_bytes()
    side = sidecar_path(path)
    if side.exists():
        meta, layers = read_sidecar(side)
        return Bundle(path, model_bytes, meta, layers)
    msg = (f"{side} not found: the sidecar is written by `tools/convert.py` (edge_cbn.convert.export) next to the "
           ".tflite and is needed to re-fuse BatchNorm statistics")
    if require_sidecar:
        raise FileNotFoundError(msg)
    warnings.warn(msg + "; running as a classifier with input (rgb - 127.5) / 127.5", stacklevel=2)
    _, h, w, _ = input_shape(model_bytes)
    meta = {"format": FORMAT, "model": path.stem, "task": "classification", "input_size": [h, w],
            "preprocess": dict(DEFAULT_PREPROCESS), "labels": [], "head": None, "layers": []}
    return Bundle(path, model_bytes, meta, [])
