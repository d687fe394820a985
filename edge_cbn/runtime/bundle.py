"""An exported model on the device: `X.tflite` (BN-folded float32) + `X.cbn.npz` (refold sidecar), and
`X.calib.tflite` (the calibration variant) when the sidecar names one.

Device side: numpy, the `tflite` flatbuffer schema package and LiteRT only.  The sidecar format is
specified in docs/DESIGN.md; `write_sidecar` and `load_bundle` are its only writer and reader.

Loading validates everything once, at load (`edge_cbn.runtime.validation`, `flatbuffer.check_model`): the
flatbuffer, the sidecar's meta against the model's tensors, every array's dtype, shape, buffer and
values.  An unusable file is a `BadInput` naming it; what loaded can be served and refolded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from . import fold
from .errors import BadInput
from .sweep import SWEEP_ROWS
# buffer_span, input_shape and input_dtype are imported from here by export and refold.
from .flatbuffer import ModelFacts, buffer_span, check_identifier, check_model, input_dtype, input_shape  # noqa: F401
from .validation import (Invalid, check_calibration_entry, check_layer_arrays, check_layer_buffers,
                         check_layer_entries, check_meta, check_noise_layers, check_sweep_entry, kernel_shape, open_npz,
                         read_members, refusing, regular_file, sidecar_specs)

FORMAT = 1
SIDECAR_SUFFIX = ".cbn.npz"
_BN_FIELDS = ("gamma", "beta", "mean", "var")
# Used when a .tflite comes without its sidecar: inference works, refold does not.
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
    """An exported model as `load_bundle` reads it: the `.tflite` bytes and its sidecar's meta and layers.

    Attributes:
        path: the `.tflite` file (None for a bundle made in memory).
        model_bytes: the whole `.tflite` flatbuffer (BN folded, float32 weights); never written in place.
        meta: the sidecar's meta (docs/DESIGN.md): "model", "task", "input_size" [h, w], "preprocess",
            "labels", "head", and "calibration" when a calibration variant was exported.
        layers: one `LayerRecord` per conv, depthwise and dense layer, in the sidecar's order; empty
            without a sidecar.
        calibration_problem: why the calibration variant the sidecar names cannot be used, "" when it can.
    """
    path: Path | None
    model_bytes: bytes
    meta: dict
    layers: list[LayerRecord]
    # TFLite-layout copies of the unfolded kernels, made once and shared (read-only) by every Refolder of
    # this bundle and of its calibration variant: one copy of the weights instead of one per model.
    _tflite_kernels: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # Why the calibration variant the sidecar names cannot be used (its file is missing), "" when it can.
    calibration_problem: str = ""

    def tflite_kernel(self, rec: "LayerRecord") -> np.ndarray:
        """`rec`'s unfolded kernel in TFLite layout, float32, read-only, shared.

        Args:
            rec: one of this bundle's `layers`.

        Returns:
            The kernel in TFLite layout (conv OHWI, depthwise 1HWC, dense OI), made on first use and cached
            by layer name.
        """
        kernel = self._tflite_kernels.get(rec.name)
        if kernel is None:
            kernel = np.ascontiguousarray(fold.to_tflite(rec.kind, np.asarray(rec.kernel, np.float32)))
            kernel.setflags(write=False)
            self._tflite_kernels[rec.name] = kernel
        return kernel

    @property
    def has_sidecar(self) -> bool:
        """True when the sidecar was loaded: the model can run under noise and be refolded."""
        return bool(self.layers)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input, in pixels."""
        return tuple(self.meta["input_size"])

    @property
    def raw_input(self) -> bool:
        """True when the model takes RGB uint8 pixels and normalises them itself (meta "preprocess"
        then documents what the graph does); False for float32 input normalised beforehand."""
        return input_dtype(self.model_bytes) == np.uint8

    @property
    def can_calibrate(self) -> bool:
        """The sidecar names a calibration variant and its file is there (`calibration_problem` says
        why not otherwise)."""
        return "calibration" in self.meta and self.path is not None and not self.calibration_problem

    def calibration_variant(self) -> "Bundle":
        """The calibration variant (same layers and arrays, its own file and buffer indices); its last
        output is the moments vector described in `edge_cbn.convert.export.moments_model`.  Its file is
        checked like the model's, and its buffers and moments output against the sidecar.

        Returns:
            A `Bundle` of `X.calib.tflite` that shares this one's meta, layer arrays and TFLite kernels.

        Raises:
            BadInput: there is no usable calibration variant (`can_calibrate` is False), or its file is not a
                valid model or not the calibration variant of this one.
        """
        if not self.can_calibrate:
            raise BadInput(self.path, self.calibration_problem or "no calibration variant (re-export it with "
                                                                  "tools/convert.py)")
        return self._variant(self.meta["calibration"], "calibration variant")

    @property
    def can_sweep(self) -> bool:
        """The sidecar names a sweep variant too (exported since 0.3) and its file is there."""
        sweep = self.meta.get("sweep")
        return self.can_calibrate and isinstance(sweep, dict) and self.path.with_name(sweep["file"]).is_file()

    def sweep_variant(self) -> "Bundle":
        """The sweep variant `X.sweep.tflite` (`edge_cbn.convert.sweep`): the calibration variant with every
        BN's correction computed in the graph from one state constant per BN, which the device writes.

        Returns:
            A `Bundle` of `X.sweep.tflite` like `calibration_variant`'s; `meta["sweep"]["states"]` gives each
            BN's SWEEP_ROWS state buffers, one float32 per channel each.

        Raises:
            BadInput: there is no usable sweep variant, or its file is not the sweep variant of this model.
        """
        if not self.can_sweep:
            raise BadInput(self.path, "no sweep variant (re-export it with tools/convert.py)")
        variant = self._variant(self.meta["sweep"], "sweep variant")
        with refusing(variant.path, f"not the sweep variant of {self.path.name}"):
            for rec in (r for r in self.layers if r.bn):
                for index in self.meta["sweep"]["states"][rec.bn]:
                    if buffer_span(variant.model_bytes, index)[1] != 4 * len(rec.mean):
                        raise Invalid(f"a state buffer of BN {rec.bn!r} does not hold {len(rec.mean)} float32")
        return variant

    def _variant(self, entry: dict, what: str) -> "Bundle":
        """A variant of this model named by a meta entry (file, sha256, buffers), checked like the model."""
        path = self.path.with_name(entry["file"])
        model_bytes, facts = read_model(path)
        check_sha256(path, model_bytes, entry.get("sha256"), sidecar_path(self.path))
        layers = [dataclasses.replace(rec, w_buffer=entry["buffers"][rec.name][0],
                                      b_buffer=entry["buffers"][rec.name][1]) for rec in self.layers]
        with refusing(path, f"not the {what} of {self.path.name}"):
            check_layer_buffers([(r.name, r.kind, r.kernel.shape, r.w_buffer, r.b_buffer) for r in layers], facts,
                                f"it is not the {what} of {self.path.name}")
            _check_moments_output(facts, layers, input_shape(self.model_bytes))
        return Bundle(path, model_bytes, self.meta, layers, self._tflite_kernels)

    def layer(self, name: str) -> LayerRecord:
        """The sidecar's record of one layer.

        Args:
            name: a layer name or the name of its BN.

        Returns:
            The `LayerRecord`.

        Raises:
            KeyError: no layer or BN of that name in the sidecar.
        """
        for rec in self.layers:
            if rec.name == name or rec.bn == name:
                return rec
        raise KeyError(f"no layer or BN named {name!r} in the sidecar")


def sweep_path(tflite_path) -> Path:
    """`X.tflite` -> `X.sweep.tflite`, the sweep variant (`Bundle.sweep_variant`)."""
    return calibration_path(tflite_path).with_name(Path(tflite_path).name[: -len(".tflite")] + ".sweep.tflite")


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


def read_model(path) -> tuple[bytes, ModelFacts]:
    """The bytes of the `.tflite` at `path` and its `flatbuffer.ModelFacts`; `BadInput` naming it when it
    cannot be used.  The identifier is read first, so a large file of something else is not read whole."""
    with refusing(path, "not a valid TFLite model"):
        with open(regular_file(path), "rb") as f:
            check_identifier(f.read(8))
            f.seek(0)
            model_bytes = f.read()
        return model_bytes, check_model(model_bytes)


def _check_moments_output(facts: ModelFacts, layers: list[LayerRecord], model_input: tuple) -> None:
    """A calibration variant takes the model's input and ends in the (1, 2 * sum of BN channels) moments."""
    channels = sum(len(rec.mean) for rec in layers if rec.bn)
    if facts.input_shape != model_input:
        raise Invalid(f"its input {facts.input_shape} is not the model's {model_input}")
    if facts.output_shapes[-1] != (1, 2 * channels):
        raise Invalid(f"its last output {facts.output_shapes[-1]} is not the moments of the sidecar's BNs "
                      f"(1, {2 * channels})")


def read_sidecar(path, facts: ModelFacts) -> tuple[dict, list[LayerRecord]]:
    """The sidecar at `path` against its model's facts: meta, layer records, their buffers in the model
    (sizes from the array headers, before any data is read), then the arrays (float32, finite, var >= 0)."""
    with refusing(path, "not a readable sidecar (.cbn.npz)"), open_npz(path) as members:
        meta = json.loads(members.text("meta"))
        check_meta(meta, facts, FORMAT)
        entries = check_layer_entries(meta.get("layers"))
        if "calibration" in meta:
            check_calibration_entry(meta["calibration"], entries)
        if "sweep" in meta:
            check_sweep_entry(meta["sweep"], entries, SWEEP_ROWS)
        check_noise_layers(meta.get("noise_layers"), entries)
        shapes = {e["name"]: kernel_shape(members, e) for e in entries}
        check_layer_buffers([(e["name"], e["kind"], shapes[e["name"]], e["w_buffer"], e["b_buffer"])
                             for e in entries], facts)
        arrays = read_members(members, sidecar_specs(entries, shapes))
        return meta, [_record(e, arrays) for e in entries]


def _record(entry: dict, arrays: dict) -> LayerRecord:
    own = {k: arrays.get(f"{entry['name']}/{k}") for k in ("kernel", "bias")}
    bn = {k: arrays.get(f"{entry['bn']}/{k}") for k in _BN_FIELDS} if entry["bn"] else {}
    check_layer_arrays(entry["name"], entry["bn"], {**own, **bn})
    return LayerRecord(**entry, **own, **bn)


def sha256(data) -> str:
    """Hex sha256 of `data` (model bytes): what a sidecar records of its model and calibration variant."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(path: Path, model_bytes, recorded, sidecar: Path) -> None:
    """The model at `path` against the sha256 its sidecar records (bundles exported before sidecars
    recorded one have none, and pass): a bit flipped in a weight would otherwise serve changed outputs
    with nothing to say so, when no noise runs.

    Raises:
        BadInput: the bytes do not match (naming the model), or the recorded value is no sha256 (naming
            the sidecar).
    """
    if recorded is None:
        return
    if not (isinstance(recorded, str) and len(recorded) == 64 and all(c in "0123456789abcdef" for c in recorded)):
        raise BadInput(sidecar, f"its recorded sha256 {str(recorded)[:70]!r} is not a sha256")
    if sha256(model_bytes) != recorded:
        raise BadInput(path, f"its bytes do not match the sha256 {sidecar.name} records: damaged or altered "
                             "since it was exported")


def _calibration_problem(path: Path, meta: dict) -> str:
    """Why the calibration variant the meta names cannot be used: its file is not beside the model."""
    if "calibration" not in meta:
        return ""
    variant = path.with_name(meta["calibration"]["file"])
    if variant.is_file():
        return ""
    return f"{variant.name} is missing beside {path.name} (a partial copy? copy {variant.name} too)"


def load_bundle(tflite_path, *, require_sidecar: bool = False) -> Bundle:
    """Read and validate `X.tflite` and its sidecar `X.cbn.npz` (`BadInput` naming the file that cannot be
    used).  Without the sidecar the model still runs (as a classifier with [-1, 1] input scaling, with a
    warning) but cannot be refolded; `require_sidecar` makes that a FileNotFoundError.

    Args:
        tflite_path: the `.tflite` file (str or path); the sidecar is `sidecar_path(tflite_path)` beside it.
        require_sidecar: refuse a model without its sidecar instead of running it as a classifier.

    Returns:
        The `Bundle`; without the sidecar its `layers` are empty and its meta is a classifier's with
        `DEFAULT_PREPROCESS`.

    Raises:
        BadInput: the model or the sidecar cannot be used (missing, not a regular file, not valid, not
            matching each other), naming that file.
        FileNotFoundError: there is no sidecar and `require_sidecar` is True.
    """
    path = Path(tflite_path)
    model_bytes, facts = read_model(path)
    side = sidecar_path(path)
    if side.exists():
        meta, layers = read_sidecar(side, facts)
        check_sha256(path, model_bytes, meta.get("model_sha256"), side)
        return Bundle(path, model_bytes, meta, layers, calibration_problem=_calibration_problem(path, meta))
    msg = (f"{side} not found: the sidecar is written by `tools/convert.py` (edge_cbn.convert.export) next to the "
           ".tflite and is needed to refold BatchNorm statistics")
    if require_sidecar:
        raise FileNotFoundError(msg)
    warnings.warn(msg + "; running as a classifier with input (rgb - 127.5) / 127.5", stacklevel=2)
    h, w = facts.input_hw
    meta = {"format": FORMAT, "model": path.stem, "task": "classification", "input_size": [h, w],
            "preprocess": dict(DEFAULT_PREPROCESS), "labels": [], "head": None, "layers": []}
    return Bundle(path, model_bytes, meta, [])
