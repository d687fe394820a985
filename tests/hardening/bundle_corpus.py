"""Generators of hostile bundles and states, all derived from one genuine tiny export (built once per
process): corrupt `.tflite` files, mismatched or corrupt sidecars `.cbn.npz`, a missing or corrupt
calibration variant, corrupt `--state` files.  Each `Case` writes its files into an empty directory and
returns the file the refusal must name; `load_case` is what the harness runs on it in a forked child.

The genuine bundle is `tests/tiny.py`'s model (conv/depthwise/dense, biases, a residual add; 16x16 uint8
input, 4 classes), plus a state saved through the real `StateStore` after a few calibration frames.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np

CANARY_ENV = "EDGE_CBN_CORPUS_CANARY"  # a file path: a pickled payload that ran would create it


@dataclasses.dataclass(frozen=True)
class Genuine:
    """The genuine files every case starts from."""
    model: Path        # tiny.tflite (+ tiny.cbn.npz, tiny.calib.tflite beside it)
    other: Path        # another model's export (other.tflite + sidecar): its sidecar is "from another model"
    state: Path        # a state saved for `model` (+ its calibrated model and sidecar beside it)

    @property
    def sidecar(self) -> Path:
        return self.model.with_name("tiny.cbn.npz")

    @property
    def calib(self) -> Path:
        return self.model.with_name("tiny.calib.tflite")


STATE_SETUP = dict(noise="relative", eta=0.05, seed=0, mode="shift", stages=2)
_GENUINE: dict = {}


def genuine_files(base: Path) -> Genuine:
    """Export the tiny models and save a state once per process (TensorFlow for the export only)."""
    if "files" not in _GENUINE:
        _GENUINE["files"] = _build(Path(base) / "genuine")
    return _GENUINE["files"]


def _build(root: Path) -> Genuine:
    from tiny import PRE, tiny_model

    from edge_cbn.convert.export import export

    model = export(tiny_model(num_classes=4), root / "tiny.tflite", name="tiny", task="classification",
                   preprocess=PRE, labels=["w", "x", "y", "z"])
    other = export(tiny_model(num_classes=6, seg=True, seed=1), root / "other" / "other.tflite", name="other",
                   task="segmentation", preprocess=PRE, labels=[f"c{i}" for i in range(5)])
    return Genuine(model, other, _save_state(model, root / "state" / "st.npz"))


def _save_state(model: Path, state: Path) -> Path:
    """Calibrate a few frames under noise and save through the real StateStore (what --state writes)."""
    from edge_cbn.runtime.bundle import load_bundle
    from edge_cbn.runtime.device_calibration import DeviceCalibration
    from edge_cbn.runtime.noise import make_noise
    from edge_cbn.runtime.noisy_model import noise_targets
    from edge_cbn.runtime.refold import Refolder
    from edge_cbn.runtime.state import Snapshot, StateStore, fingerprint

    bundle = load_bundle(model)
    chip = make_noise("relative", 0.05, 0).instantiate(noise_targets(bundle))
    cal = DeviceCalibration(bundle, chip, num_threads=1, mode="shift", refold_every=1, stages=2)
    rng = np.random.default_rng(0)
    for i in range(4):
        cal.step(rng.integers(0, 256, (1, 16, 16, 3), np.uint8), i)
    stats = cal.statistics()
    refolder = Refolder(bundle)
    refolder.refold(stats)
    state.parent.mkdir(parents=True)
    store = StateStore(state, bundle, fingerprint(bundle, **STATE_SETUP))
    store.save(Snapshot(stats, cal.calibrator.state_dict(), refolder.model_bytes(),
                        {"frames": 4, "refolds": 2, "calibration_frames": 4, "progress": 1.0}))
    return state


def load_state(state: Path, model: Path):
    """The state loader as the stream runs it: the source bundle, then the state checked and loaded into
    a calibrator of the same setup."""
    from edge_cbn.runtime.bundle import load_bundle
    from edge_cbn.runtime.state import StateStore, fingerprint
    from edge_cbn.runtime.stream_calibrator import StreamCalibrator

    bundle = load_bundle(model)
    calibrator = StreamCalibrator(bundle, mode=STATE_SETUP["mode"], stages=STATE_SETUP["stages"], refold_every=1)
    return StateStore(state, bundle, fingerprint(bundle, **STATE_SETUP)).load(calibrator=calibrator)


def load_variant(model: Path):
    from edge_cbn.runtime.bundle import load_bundle

    return load_bundle(model).calibration_variant()


# ------------------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str                               # "model", "sidecar", "calibration", "state"
    make: Callable[[Path, Genuine], Path]   # (empty dir, genuine files) -> the file the refusal must name

    def build(self, root: Path, genuine: Genuine) -> tuple[Path, Path]:
        """Write the case into `root`: (the model, the file the refusal names: for a state, the state)."""
        model = root / "tiny.tflite"
        for src in (genuine.model, genuine.sidecar, genuine.calib):
            shutil.copy(src, root / src.name)
        if self.kind == "state":
            for src in genuine.state.parent.iterdir():
                shutil.copy(src, root / src.name)
        return model, self.make(root, genuine)


def load_case(kind: str, target: Path, model: Path):
    """What the harness runs for a case of `kind`."""
    from edge_cbn.runtime.bundle import load_bundle

    if kind == "state":
        return load_state(target, model)
    if kind == "calibration":
        return load_variant(model)
    return load_bundle(model)


# ---------------------------------------------------------------------------------- .tflite cases
def _rewrite(path: Path, mutate) -> Path:
    data = bytearray(path.read_bytes())
    mutate(data)
    path.write_bytes(bytes(data))
    return path


def _model_case(mutate) -> Callable:
    return lambda root, g: _rewrite(root / "tiny.tflite", mutate)


def _tables(data):
    import tflite

    model = tflite.Model.GetRootAs(bytes(data), 0)
    return model, model.Subgraphs(0)


def _field(table, vtable_offset: int) -> int:
    """Byte position of a table's scalar field (it must be present)."""
    off = table._tab.Offset(vtable_offset)
    assert off, "field absent in the genuine model"
    return table._tab.Pos + off


def _vector(table, vtable_offset: int) -> int:
    return table._tab.Vector(table._tab.Offset(vtable_offset))


def _input_tensor(data):
    _, graph = _tables(data)
    return graph.Tensors(int(graph.Inputs(0)))


def _set_input_shape(shape):
    def mutate(data):
        pos = _vector(_input_tensor(data), 4)  # Tensor.shape
        struct.pack_into("<4i", data, pos, *shape)
    return mutate


def _float_constant(data):
    """(byte offset, count) of the first float32 tensor with data (a kernel)."""
    import tflite

    from edge_cbn.runtime.flatbuffer import buffer_span

    model, graph = _tables(data)
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        start, size = buffer_span(bytes(data), t.Buffer(), model)
        if t.Type() == tflite.TensorType.FLOAT32 and size >= 4:
            return start, size // 4
    raise AssertionError("no float constant")


def _poke_float(value: float):
    def mutate(data):
        start, count = _float_constant(data)
        struct.pack_into("<f", data, start + 4 * (count // 2), value)
    return mutate


def _operator(data, index=1):
    _, graph = _tables(data)
    return graph.Operators(index)


def _op_input(value):
    def mutate(data):
        struct.pack_into("<i", data, _vector(_operator(data), 6), value)  # Operator.inputs[0]
    return mutate


def _op_opcode(value):
    def mutate(data):
        op = next(_operator(data, i) for i in range(_tables(data)[1].OperatorsLength())
                  if _operator(data, i)._tab.Offset(4))
        struct.pack_into("<I", data, _field(op, 4), value)  # Operator.opcode_index
    return mutate


def _tensor_buffer(value):
    def mutate(data):
        struct.pack_into("<I", data, _field(_input_tensor(data), 8), value)  # Tensor.buffer
    return mutate


def _buffer_length(value):
    def mutate(data):
        start, _ = _float_constant(data)
        struct.pack_into("<I", data, start - 4, value)  # the data vector's length prefix
    return mutate


def _garbage(seed):
    def make(root, g):
        path = root / "tiny.tflite"
        noise = bytearray(np.random.default_rng(seed).integers(0, 256, path.stat().st_size, np.uint8).tobytes())
        noise[4:8] = b"TFL3"
        path.write_bytes(bytes(noise))
        return path
    return make


def _truncate(keep):
    def mutate(data):
        n = keep(len(data))
        del data[n:]
    return mutate


def _zero(span):
    def mutate(data):
        a, b = span(data)
        data[a:b] = bytes(b - a)
    return mutate


def _replace_with(content: Callable[[Genuine], bytes], file_name: str = "tiny.tflite"):
    """A case whose file `file_name` is `content` (of the genuine files) as a whole."""
    def make(root, g):
        path = root / file_name
        path.write_bytes(content(g))
        return path
    return make


def _a_directory(root, g):
    path = root / "tiny.tflite"
    path.unlink()
    path.mkdir()
    return path


def _the_variant_as_model(root, g):
    """X.calib.tflite copied over X.tflite: a valid model, but the sidecar's buffers are not its."""
    shutil.copy(g.calib, root / "tiny.tflite")
    return root / "tiny.cbn.npz"


def _root_table(data):
    pos = struct.unpack_from("<I", data, 0)[0]
    return pos, pos + 4


MODEL_CASES = [
    *[Case(f"truncated-{name}", "model", _model_case(_truncate(keep))) for name, keep in [
        ("empty", lambda n: 0), ("4-bytes", lambda n: 4), ("7-bytes", lambda n: 7), ("8-bytes", lambda n: 8),
        ("100-bytes", lambda n: 100), ("quarter", lambda n: n // 4), ("half", lambda n: n // 2),
        ("three-quarters", lambda n: 3 * n // 4), ("last-byte", lambda n: n - 1)]],
    Case("identifier-TFL2", "model", _model_case(lambda d: d.__setitem__(slice(4, 8), b"TFL2"))),
    Case("root-offset-past-end", "model", _model_case(lambda d: struct.pack_into("<I", d, 0, len(d) + 100))),
    Case("root-offset-flipped-bit", "model", _model_case(lambda d: d.__setitem__(1, d[1] ^ 0x40))),
    Case("zeroed-root-table", "model", _model_case(_zero(_root_table))),
    Case("zeroed-all", "model", _model_case(_zero(lambda d: (0, len(d))))),
    Case("zeroed-first-64", "model", _model_case(_zero(lambda d: (0, 64)))),
    Case("schema-version-2", "model", _model_case(
        lambda d: struct.pack_into("<I", d, _field(_tables(d)[0], 4), 2))),
    Case("input-70000x70000", "model", _model_case(_set_input_shape((1, 70000, 70000, 3)))),
    Case("input-batch-2", "model", _model_case(_set_input_shape((2, 16, 16, 3)))),
    Case("input-0x0", "model", _model_case(_set_input_shape((1, 0, 0, 3)))),
    Case("input-negative", "model", _model_case(_set_input_shape((1, -16, 16, 3)))),
    Case("input-type-int8", "model", _model_case(
        lambda d: d.__setitem__(_field(_input_tensor(d), 6), 9))),  # Tensor.type = INT8
    Case("operator-input-out-of-range", "model", _model_case(_op_input(100000))),
    Case("operator-input-negative", "model", _model_case(_op_input(-7))),
    Case("opcode-index-out-of-range", "model", _model_case(_op_opcode(4000))),
    Case("tensor-buffer-out-of-range", "model", _model_case(_tensor_buffer(1 << 20))),
    Case("buffer-length-huge", "model", _model_case(_buffer_length(0x7FFFFFF0))),
    Case("buffer-length-short", "model", _model_case(_buffer_length(8))),
    Case("float-constant-nan", "model", _model_case(_poke_float(float("nan")))),
    Case("float-constant-inf", "model", _model_case(_poke_float(float("inf")))),
    *[Case(f"garbage-{seed}", "model", _garbage(seed)) for seed in range(3)],
    Case("text-file", "model", _replace_with(lambda g: b"this is not a model\n" * 10)),
    Case("npz-renamed", "model", _replace_with(lambda g: g.sidecar.read_bytes())),
    Case("a-directory", "model", _a_directory),
    Case("calibration-variant-as-model", "model", _the_variant_as_model),
]


# ---------------------------------------------------------------------------------- sidecar cases
def _arrays(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _meta(arrays: dict) -> dict:
    return json.loads(arrays["meta"].item())


def _save(path: Path, arrays: dict, meta: dict | None = None) -> Path:
    if meta is not None:
        arrays = {**arrays, "meta": np.array(json.dumps(meta))}
    with open(path, "wb") as f:  # np.savez on a path would append .npz to names that lack it
        np.savez(f, **arrays)
    return path


def _npz_case(kind: str, file_name: str, name, change_arrays=None, change_meta=None) -> Case:
    """A case of an .npz file (`kind` "sidecar" or "state", the genuine one at `root / file_name`):
    `change_arrays(arrays, meta)` edits arrays in place, `change_meta(meta)` the meta."""
    def make(root, g):
        path = root / file_name
        arrays = _arrays(path)
        meta = _meta(arrays)
        if change_arrays:
            change_arrays(arrays, meta)
        if change_meta:
            change_meta(meta)
        return _save(path, arrays, meta if change_meta else None)
    return Case(name, kind, make)


def _sidecar_case(name, change_arrays=None, change_meta=None) -> Case:
    return _npz_case("sidecar", "tiny.cbn.npz", name, change_arrays, change_meta)


def _bn(meta, i=0) -> str:
    return [layer["bn"] for layer in meta["layers"] if layer["bn"]][i]


def _layer(meta, i=0) -> str:
    return meta["layers"][i]["name"]


def _set(key_fn, value_fn):
    def change(arrays, meta):
        key = key_fn(meta)
        arrays[key] = value_fn(arrays[key])
    return change


def _poke(value):
    def change(a):
        a = a.copy()
        a.flat[len(a.flat) // 2] = value
        return a
    return change


class Canary:
    """Unpickling it would create the canary file: proof that nothing in a corpus file executed."""

    def __reduce__(self):
        return (open, (os.environ.get(CANARY_ENV, "/tmp/edge-cbn-canary"), "w"))


def _pickled_object_member(arrays, meta):
    arrays[f"{_bn(meta)}/var"] = np.array([Canary(), 1.0], dtype=object)


def _whole_file(content: Callable[[Genuine], bytes]):
    def make(root, g):
        path = root / "tiny.cbn.npz"
        path.write_bytes(content(g))
        return path
    return make


def _fake_member(path: Path, member: str, shape, dtype: str = "<f4") -> Path:
    """Replace `member` of the .npz at `path` by one whose .npy header claims `shape` (gigabytes) over a
    few bytes of data."""
    import zipfile

    arrays = _arrays(path)
    arrays.pop(member, None)
    _save(path, arrays)
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(member + ".npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(64))
    return path


def _header_claims(name_fn, shape, dtype="<f4"):
    def make(root, g):
        path = root / "tiny.cbn.npz"
        return _fake_member(path, name_fn(_meta(_arrays(path))), shape, dtype)
    return make


def _other_sidecar(root, g):
    """The sidecar of another export (its buffer indices exist in this model, with other sizes)."""
    shutil.copy(g.other.with_name("other.cbn.npz"), root / "tiny.cbn.npz")
    return root / "tiny.cbn.npz"


def _swap_buffers(meta):
    a, b = meta["layers"][0], meta["layers"][1]
    a["w_buffer"], b["w_buffer"] = b["w_buffer"], a["w_buffer"]


def _share_buffer(meta):
    meta["layers"][1]["w_buffer"] = meta["layers"][0]["w_buffer"]


def _del(key):
    return lambda meta: meta.pop(key)


def _pre(key, value):
    return lambda meta: meta["preprocess"].__setitem__(key, value)


SIDECAR_CASES = [
    Case("other-models-sidecar", "sidecar", _other_sidecar),
    _sidecar_case("swapped-kernel-buffers", change_meta=_swap_buffers),
    _sidecar_case("shared-kernel-buffer", change_meta=_share_buffer),
    _sidecar_case("kernel-buffer-out-of-range", change_meta=lambda m: m["layers"][0].__setitem__("w_buffer", 9999)),
    _sidecar_case("bias-buffer-negative", change_meta=lambda m: m["layers"][0].__setitem__("b_buffer", -1)),
    _sidecar_case("kernel-transposed", _set(lambda m: f"{_layer(m)}/kernel", lambda a: np.ascontiguousarray(a.T))),
    _sidecar_case("kernel-one-channel-more", _set(lambda m: f"{_layer(m)}/kernel",
                                                  lambda a: np.concatenate([a, a[..., :1]], -1))),
    _sidecar_case("mean-one-channel-short", _set(lambda m: f"{_bn(m)}/mean", lambda a: a[:-1])),
    _sidecar_case("gamma-2d", _set(lambda m: f"{_bn(m)}/gamma", lambda a: a[None])),
    _sidecar_case("var-nan", _set(lambda m: f"{_bn(m, 1)}/var", _poke(np.nan))),
    _sidecar_case("var-negative", _set(lambda m: f"{_bn(m, 2)}/var", _poke(-1.0))),
    _sidecar_case("mean-inf", _set(lambda m: f"{_bn(m)}/mean", _poke(np.inf))),
    _sidecar_case("gamma-nan", _set(lambda m: f"{_bn(m)}/gamma", _poke(np.nan))),
    _sidecar_case("kernel-inf", _set(lambda m: f"{_layer(m, 2)}/kernel", _poke(-np.inf))),
    _sidecar_case("bias-nan", _set(lambda m: "fc/bias", _poke(np.nan))),
    _sidecar_case("kernel-float64", _set(lambda m: f"{_layer(m)}/kernel", lambda a: a.astype(np.float64))),
    _sidecar_case("mean-int32", _set(lambda m: f"{_bn(m)}/mean", lambda a: a.astype(np.int32))),
    _sidecar_case("var-text", _set(lambda m: f"{_bn(m)}/var", lambda a: a.astype(str))),
    _sidecar_case("pickled-object-member", _pickled_object_member),
    Case("whole-file-a-pickle", "sidecar", _whole_file(lambda g: pickle.dumps({"meta": Canary()}))),
    Case("garbage", "sidecar", _whole_file(lambda g: np.random.default_rng(7).bytes(4000))),
    Case("truncated-half", "sidecar", _whole_file(lambda g: g.sidecar.read_bytes()[: g.sidecar.stat().st_size // 2])),
    Case("truncated-tail", "sidecar", _whole_file(lambda g: g.sidecar.read_bytes()[:-30])),
    Case("empty", "sidecar", _whole_file(lambda g: b"")),
    Case("a-bare-npy", "sidecar", _whole_file(lambda g: b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': "
                                                         b"False, 'shape': (1,), }" + b" " * 57 + b"\n" + bytes(4))),
    _sidecar_case("meta-missing", lambda a, m: a.pop("meta")),
    _sidecar_case("meta-not-json", lambda a, m: a.__setitem__("meta", np.array("{not json"))),
    _sidecar_case("meta-a-list", lambda a, m: a.__setitem__("meta", np.array("[1, 2]"))),
    _sidecar_case("meta-nested-100000", lambda a, m: a.__setitem__("meta", np.array("[" * 100000 + "]" * 100000))),
    _sidecar_case("meta-a-number-array", lambda a, m: a.__setitem__("meta", np.arange(3.0))),
    Case("meta-claims-400MB", "sidecar", _header_claims(lambda m: "meta", (), "<U100000000")),
    Case("kernel-claims-40GB", "sidecar", _header_claims(lambda m: f"{_layer(m)}/kernel", (100000, 100000, 1, 1))),
    _sidecar_case("format-2", change_meta=lambda m: m.__setitem__("format", 2)),
    _sidecar_case("no-task", change_meta=_del("task")),
    _sidecar_case("task-unknown", change_meta=lambda m: m.__setitem__("task", "regression")),
    _sidecar_case("labels-a-string", change_meta=lambda m: m.__setitem__("labels", "wxyz")),
    _sidecar_case("labels-numbers", change_meta=lambda m: m.__setitem__("labels", [1, 2, 3, 4])),
    _sidecar_case("labels-3-for-4-classes", change_meta=lambda m: m.__setitem__("labels", ["a", "b", "c"])),
    _sidecar_case("mean-length-2", change_meta=_pre("mean", [1.0, 2.0])),
    _sidecar_case("std-length-4", change_meta=_pre("std", [1.0, 2.0, 3.0, 4.0])),
    _sidecar_case("std-zero", change_meta=_pre("std", [60.0, 0.0, 57.0])),
    _sidecar_case("mean-nan", change_meta=_pre("mean", [float("nan"), 1.0, 1.0])),
    _sidecar_case("mean-strings", change_meta=_pre("mean", ["a", "b", "c"])),
    _sidecar_case("letterbox-with-uint8-input", change_meta=_pre("letterbox", True)),
    _sidecar_case("no-preprocess", change_meta=_del("preprocess")),
    _sidecar_case("input-size-0x0", change_meta=lambda m: m.__setitem__("input_size", [0, 0])),
    _sidecar_case("input-size-70000x70000", change_meta=lambda m: m.__setitem__("input_size", [70000, 70000])),
    _sidecar_case("input-size-a-string", change_meta=lambda m: m.__setitem__("input_size", "16x16")),
    _sidecar_case("detection-without-head", change_meta=lambda m: m.__setitem__("task", "detection")),
    _sidecar_case("layers-not-a-list", change_meta=lambda m: m.__setitem__("layers", {"a": 1})),
    _sidecar_case("layer-without-kind", change_meta=lambda m: m["layers"][0].pop("kind")),
    _sidecar_case("layer-kind-lstm", change_meta=lambda m: m["layers"][0].__setitem__("kind", "lstm")),
    _sidecar_case("eps-zero", change_meta=lambda m: m["layers"][0].__setitem__("eps", 0.0)),
    _sidecar_case("eps-a-string", change_meta=lambda m: m["layers"][0].__setitem__("eps", "1e-3")),
    _sidecar_case("kernel-missing", lambda a, m: a.pop(f"{_layer(m)}/kernel")),
    _sidecar_case("var-missing", lambda a, m: a.pop(f"{_bn(m)}/var")),
    _sidecar_case("unexpected-array", lambda a, m: a.__setitem__("junk/array", np.zeros(3, np.float32))),
    _sidecar_case("calibration-file-traversal",
                  change_meta=lambda m: m["calibration"].__setitem__("file", "../../../etc/passwd.tflite")),
    _sidecar_case("calibration-bns-reordered",
                  change_meta=lambda m: m["calibration"].__setitem__("bns", m["calibration"]["bns"][::-1])),
    _sidecar_case("calibration-buffers-missing-layer",
                  change_meta=lambda m: m["calibration"]["buffers"].pop(_layer(m))),
]


# ------------------------------------------------------------------------------ calibration cases
def _calib_file(content: Callable[[bytes], bytes]):
    def make(root, g):
        path = root / "tiny.calib.tflite"
        path.write_bytes(content(path.read_bytes()))
        return path
    return make


def _model_as_variant(root: Path, g: Genuine) -> Path:
    """X.tflite copied over X.calib.tflite: the model without the moments output."""
    shutil.copy(g.model, root / "tiny.calib.tflite")
    return root / "tiny.calib.tflite"


CALIBRATION_CASES = [
    Case("variant-truncated", "calibration", _calib_file(lambda b: b[: len(b) // 2])),
    Case("variant-garbage", "calibration", _calib_file(lambda b: b[:8] + bytes(len(b) - 8))),
    Case("variant-empty", "calibration", _calib_file(lambda b: b"")),
    Case("variant-is-the-model", "calibration", _model_as_variant),
    Case("variant-buffers-swapped", "calibration", lambda root, g: _swap_variant_buffers(root)),
]


def _swap_variant_buffers(root: Path) -> Path:
    """The sidecar's calibration buffers of two layers swapped: the variant's own file then disagrees."""
    path = root / "tiny.cbn.npz"
    arrays = _arrays(path)
    meta = _meta(arrays)
    buffers = meta["calibration"]["buffers"]
    a, b = list(buffers)[:2]
    buffers[a], buffers[b] = buffers[b], buffers[a]
    _save(path, arrays, meta)
    return root / "tiny.calib.tflite"


# ------------------------------------------------------------------------------------ state cases
def _state_case(name, change_arrays=None, change_meta=None) -> Case:
    return _npz_case("state", "st.npz", name, change_arrays, change_meta)


def _state_bn(arrays, i=0) -> str:
    return sorted({k.split("/")[1] for k in arrays if k.startswith("stats/")})[i]


def _state_set(key_fn, value_fn):
    def change(arrays, meta):
        key = key_fn(arrays)
        arrays[key] = value_fn(arrays[key])
    return change


def _whole_state(content: Callable[[Genuine], bytes]):
    return _replace_with(content, "st.npz")


STATE_CASES = [
    Case("truncated-half", "state", _whole_state(lambda g: g.state.read_bytes()[: g.state.stat().st_size // 2])),
    Case("truncated-tail", "state", _whole_state(lambda g: g.state.read_bytes()[:-10])),
    Case("garbage", "state", _whole_state(lambda g: np.random.default_rng(3).bytes(3000))),
    Case("empty", "state", _whole_state(lambda g: b"")),
    Case("a-pickle", "state", _whole_state(lambda g: pickle.dumps({"meta": Canary()}))),
    _state_case("stats-mean-nan", _state_set(lambda a: f"stats/{_state_bn(a)}/mean", _poke(np.nan))),
    _state_case("stats-var-negative", _state_set(lambda a: f"stats/{_state_bn(a, 1)}/var", _poke(-0.5))),
    _state_case("stats-var-inf", _state_set(lambda a: f"stats/{_state_bn(a, 2)}/var", _poke(np.inf))),
    _state_case("applied-var-inf", _state_set(lambda a: f"cal/applied/{_state_bn(a)}/var", _poke(np.inf))),
    _state_case("applied-mean-nan", _state_set(lambda a: f"cal/applied/{_state_bn(a, 3)}/mean", _poke(np.nan))),
    _state_case("noisy-moments-nan", _state_set(lambda a: f"cal/noisy/{_state_bn(a)}/mean", _poke(np.nan))),
    _state_case("clean-moments-inf", _state_set(lambda a: f"cal/clean/{_state_bn(a)}/c", _poke(np.inf))),
    _state_case("stats-one-channel-more", _state_set(lambda a: f"stats/{_state_bn(a)}/mean",
                                                     lambda x: np.append(x, x[:1]))),
    _state_case("noisy-mean-wrong-shape", _state_set(lambda a: f"cal/noisy/{_state_bn(a)}/mean", lambda x: x[:-1])),
    _state_case("noisy-count-a-vector", _state_set(lambda a: f"cal/noisy/{_state_bn(a)}/count",
                                                   lambda x: np.full(4, x))),
    _state_case("stats-float64", _state_set(lambda a: f"stats/{_state_bn(a)}/var", lambda x: x.astype(np.float64))),
    _state_case("stage-a-float", _state_set(lambda a: "cal/stage", lambda x: x.astype(np.float64))),
    _state_case("mode-a-number", _state_set(lambda a: "cal/mode", lambda x: np.array(3))),
    _state_case("stats-key-missing", lambda a, m: a.pop(f"stats/{_state_bn(a)}/var")),
    _state_case("calibrator-key-missing", lambda a, m: a.pop(f"cal/clean/{_state_bn(a)}/k")),
    _state_case("extra-key", lambda a, m: a.__setitem__("junk", np.zeros(2))),
    _state_case("extra-calibrator-key", lambda a, m: a.__setitem__("cal/noisy/ghost.bn/mean", np.zeros(2))),
    _state_case("extra-stats-key", lambda a, m: a.__setitem__("stats/ghost.bn/mean", np.zeros(2, np.float32))),
    _state_case("pickled-object-member", lambda a, m: a.__setitem__(f"stats/{_state_bn(a)}/var",
                                                                    np.array([Canary()], dtype=object))),
    _state_case("format-2", change_meta=lambda m: m.__setitem__("format", 2)),
    _state_case("meta-missing", lambda a, m: a.pop("meta")),
    _state_case("meta-not-json", lambda a, m: a.__setitem__("meta", np.array("{{{"))),
    _state_case("frames-negative", change_meta=lambda m: m.__setitem__("frames", -5)),
    _state_case("refolds-a-string", change_meta=lambda m: m.__setitem__("refolds", "many")),
    _state_case("k-above-one", _state_set(lambda a: f"cal/noisy/{_state_bn(a)}/k", lambda x: np.array(1.5))),
    _state_case("count-negative", _state_set(lambda a: f"cal/noisy/{_state_bn(a)}/count", lambda x: np.array(-1.0))),
    _state_case("stage-beyond-warm-up", _state_set(lambda a: "cal/stage", lambda x: np.array(99))),
    _state_case("noisy-clean-counts-differ", _state_set(lambda a: f"cal/clean/{_state_bn(a)}/count",
                                                        lambda x: x + 1)),
    _state_case("calibrator-mode-absolute", _state_set(lambda a: "cal/mode", lambda x: np.array("absolute"))),
    Case("stats-claim-40GB", "state", lambda root, g: _header_claims_state(root, (10_000_000_000,))),
]


def _header_claims_state(root: Path, shape) -> Path:
    path = root / "st.npz"
    return _fake_member(path, f"stats/{_state_bn(_arrays(path))}/mean", shape)


ALL_CASES = MODEL_CASES + SIDECAR_CASES + CALIBRATION_CASES + STATE_CASES
