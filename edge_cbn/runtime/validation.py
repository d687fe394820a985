"""The checks on what edge-cbn reads from disk: .npz archives read member by member, the sidecar's meta and
arrays against its model's tensors (`flatbuffer.ModelFacts`; the `.tflite` itself: `flatbuffer.check_model`),
saved states, BN statistics.  One module, so that each check exists once and every loader
(`bundle.load_bundle`, `Bundle.calibration_variant`, `state.StateStore.load`, the calibrator) uses the
same one.  Device side: numpy only.

A check raises `Invalid` (a one-line reason without the file name); the loader's `refusing(path, what)`
block turns it, and any other exception a hostile file provokes in a parser (struct.error, IndexError,
zipfile's, numpy's, LiteRT's), into `BadInput(path, reason)`.  Nothing is allocated from a size a file
declares before that size has been checked against what the model implies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import stat
from pathlib import Path

import numpy as np

from .errors import BadInput
from .fold import KINDS, WEIGHT_KINDS

MAX_META_CHARS = 1 << 22      # a JSON meta string (ImageNet labels and layer records take ~100 K)
TASKS = ("classification", "detection", "segmentation", "raw")  # raw: outputs edge-cbn does not interpret


class Invalid(ValueError):
    """What is wrong with an input, one line, without its path (the loader names the file)."""


def one_line(text: str, limit: int = 300) -> str:
    """`text` with its whitespace runs (LiteRT's messages span lines) folded into single spaces, cut at
    `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_NOT_REGULAR = ((stat.S_ISDIR, "is a directory, not a file"),
                (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file: reading it could wait forever"),
                (stat.S_ISCHR, "is a device, not a regular file"), (stat.S_ISBLK, "is a device, not a regular file"),
                (stat.S_ISSOCK, "is a socket, not a regular file"))


def regular_file(path) -> Path:
    """`path` when it names a regular file (symlinks followed); else `BadInput` saying what it is (missing,
    a dangling link, a directory, a FIFO, a device): nothing then blocks on a pipe or reads a device."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadInput(path, "a link to nothing" if path.is_symlink() else "does not exist") from None
    except OSError as e:
        raise BadInput(path, one_line(f"cannot read it: {e.strerror or e}")) from None
    for test, reason in _NOT_REGULAR:
        if test(mode):
            raise BadInput(path, reason)
    if not stat.S_ISREG(mode):
        raise BadInput(path, "is not a regular file")
    return path


@contextlib.contextmanager
def refusing(path, what: str):
    """Any exception in the block becomes `BadInput(path, ...)`: an `Invalid` with its own reason, anything
    else (a parser tripping over a hostile file) as "`what` (TypeName: message)"."""
    try:
        yield
    except BadInput:
        raise
    except Invalid as e:
        raise BadInput(path, one_line(str(e))) from None
    except MemoryError:
        raise BadInput(path, f"{what} (it does not fit in memory)") from None
    except OSError as e:  # missing, a directory, no permission (zipfile's and numpy's errors are not OSError)
        raise BadInput(path, one_line(f"cannot read it: {e.strerror or e}")) from None
    except Exception as e:  # noqa: BLE001 - a hostile file can trip any parser in any way
        raise BadInput(path, one_line(f"{what} ({type(e).__name__}: {e})")) from None


# ------------------------------------------------------------------------------------------- numbers
def all_finite(*arrays) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def stats_problem(mean, var, channels: int | None = None) -> str | None:
    """Why BN statistics (mean, var) cannot be folded, or None: shapes, finiteness, var >= 0."""
    mean, var = np.asarray(mean), np.asarray(var)
    want = (channels,) if channels is not None else mean.shape
    if mean.shape != want or var.shape != want or mean.ndim != 1:
        return f"shapes {mean.shape} and {var.shape}, expected ({channels if channels is not None else 'C'},)"
    if not all_finite(mean, var):
        return "not finite (NaN or Inf)"
    if (var < 0).any():
        return "negative variance"
    return None


def check_bn_stats(bn: str, mean, var, channels: int | None = None) -> None:
    problem = stats_problem(mean, var, channels)
    if problem:
        raise Invalid(f"statistics of BN {bn!r}: {problem}")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A JSON number that is finite as a float32 (NaN and infinities compare false; Python compares a
    huge integer with a float exactly, where math.isfinite would overflow)."""
    return (is_int(x) or isinstance(x, float)) and abs(x) < 3.4e38


def check_count(what: str, x) -> int:
    """A non-negative integer (JSON number or 0-d integer array)."""
    if isinstance(x, np.ndarray):
        if x.shape != () or x.dtype.kind not in "iu":
            raise Invalid(f"{what}: expected an integer, got a {x.dtype} array of shape {x.shape}")
        x = int(x)
    if not is_int(x) or x < 0:
        raise Invalid(f"{what}: expected an integer >= 0, got {x!r}")
    return x


# --------------------------------------------------------------------------------------------- .npz
@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """What one .npz member may be: dtype kinds ("f" float, "iu" integer, "U" text) and itemsizes, and
    its allowed shapes."""
    kinds: str
    shapes: tuple            # allowed shapes, e.g. ((), (64,))
    itemsizes: tuple = (4, 8)
    optional: bool = False


class NpzMembers:
    """An .npz opened with `np.load(allow_pickle=False)`.  A member's header (dtype, shape) is read and
    checked before its data, so a file cannot make the reader allocate more than the caller accepts, and
    an object array (a pickle) is refused by its dtype before a byte of it is read."""

    def __init__(self, archive):
        self._z = archive
        self.names = set(archive.files)

    def header(self, name: str) -> tuple[tuple, np.dtype]:
        """(shape, dtype) of member `name`, from its .npy header only."""
        with self._open(name) as f:
            shape, _, dtype = self._read_header(f, name)
        return shape, dtype

    def array(self, name: str, spec: ArraySpec) -> np.ndarray:
        """Member `name`, read only after its header passed `spec`: exactly the bytes that header declares,
        into an array allocated once (numpy's own reader would parse the header a second time)."""
        with self._open(name) as f:
            shape, fortran, dtype = self._read_header(f, name)
            check_spec(name, shape, dtype, spec)
            flat = np.empty(math.prod(shape), dtype)
            view = memoryview(flat).cast("B")
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise Invalid(f"array {name!r} is cut short ({done} of {len(view)} bytes)")
                done += n
        value = flat.reshape(shape, order="F" if fortran else "C")
        return value if dtype.isnative else value.astype(dtype.newbyteorder("="))

    def _open(self, name: str):
        if name not in self.names:
            raise Invalid(f"missing array {name!r}")
        return self._z.zip.open(name + ".npy")

    @staticmethod
    def _read_header(f, name: str) -> tuple[tuple, bool, np.dtype]:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise Invalid(f"array {name!r}: .npy format {version} is not supported")
        return tuple(shape), fortran, dtype

    def text(self, name: str) -> str:
        return str(self.array(name, ArraySpec("U", ((),))).item())


def _describe(spec: ArraySpec) -> str:
    names = {"f": "float", "i": "int", "u": "uint", "U": "text"}
    kinds = "/".join(names[k] for k in spec.kinds)
    return kinds if spec.kinds == "U" else f"{kinds} of {'/'.join(str(8 * s) for s in spec.itemsizes)} bits"


@contextlib.contextmanager
def open_npz(path):
    """`NpzMembers` of the archive at `path`; `Invalid` for anything that is not an .npz (a bare .npy,
    a pickle, garbage: told by the zip signature before numpy looks, and never unpickled)."""
    with open(regular_file(path), "rb") as f:
        signature = f.read(4)
    if signature not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise Invalid("not an .npz archive (no zip signature)")
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise Invalid("not an .npz archive")
    with archive:
        yield NpzMembers(archive)


def check_spec(name: str, shape: tuple, dtype: np.dtype, spec: ArraySpec) -> None:
    """An array's shape and dtype against `spec` (text: at most MAX_META_CHARS characters)."""
    size = dtype.itemsize // 4 if dtype.kind == "U" else dtype.itemsize
    if dtype.kind not in spec.kinds or dtype.hasobject or (dtype.kind != "U" and size not in spec.itemsizes):
        raise Invalid(f"array {name!r} has dtype {dtype}, expected {_describe(spec)}")
    if dtype.kind == "U" and size > MAX_META_CHARS:
        raise Invalid(f"array {name!r}: a text of {size} characters (at most {MAX_META_CHARS})")
    if shape not in spec.shapes:
        raise Invalid(f"array {name!r} has shape {shape}, expected " + " or ".join(map(str, spec.shapes)))


def check_names(present, specs: dict, prefix: str = "") -> None:
    """The names `present` (under `prefix`, given without it) are exactly those of `specs` ({name:
    ArraySpec}), optional ones aside: a missing or an unexpected array is `Invalid`."""
    missing = [n for n, s in specs.items() if not s.optional and n not in present]
    extra = sorted(set(present) - set(specs))
    for names, what in ((missing, "missing array"), (extra, "unexpected array")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise Invalid(f"{what} {prefix + names[0]!r}{more}")


def check_arrays(arrays: dict, specs: dict, prefix: str = "") -> None:
    """An in-memory {name: array} against `specs`: names, then each array's dtype and shape."""
    check_names(set(arrays), specs, prefix)
    for name, value in arrays.items():
        value = np.asarray(value)
        check_spec(prefix + name, value.shape, value.dtype, specs[name])


def read_members(members: NpzMembers, specs: dict, prefix: str = "") -> dict:
    """{name: array} of the members under `prefix` (names without it), exactly those of `specs`, each
    read after its header passed its spec."""
    present = {n[len(prefix):] for n in members.names if n.startswith(prefix)}
    check_names(present, specs, prefix)
    return {n: members.array(prefix + n, specs[n]) for n in sorted(present)}


# ------------------------------------------------------------------------------------ sidecar meta
_LAYER_KEYS = {"name", "kind", "bn", "eps", "w_buffer", "b_buffer"}
_KERNEL_NDIM = {"conv": 4, "depthwise": 4, "dense": 2, "transpose": 4, "affine": 4}


def check_meta(meta, facts, fmt: int) -> None:
    """The sidecar meta against its model's `flatbuffer.ModelFacts` (docs/DESIGN.md has the schema):
    format, task, input size (= the model's input tensor: sizes are never taken from meta alone),
    preprocessing, labels (as many as the model has classes, when that is knowable; a raw model's may be
    empty), the detection head."""
    if not isinstance(meta, dict):
        raise Invalid("meta is not a JSON object")
    if meta.get("format") != fmt:
        raise Invalid(f"sidecar format {one_line(repr(meta.get('format')), 60)}, this edge-cbn reads {fmt}")
    if not isinstance(meta.get("model"), str):
        raise Invalid(f"meta model {one_line(repr(meta.get('model')), 60)} is not a name")
    if meta.get("task") not in TASKS:
        raise Invalid(f"meta task {one_line(repr(meta.get('task')), 60)}; expected one of {', '.join(TASKS)}")
    size = meta.get("input_size")
    well_formed = isinstance(size, list) and len(size) == 2 and all(is_int(d) for d in size)
    if not well_formed or tuple(size) != facts.input_hw:
        raise Invalid(f"meta input_size {one_line(repr(size), 60)} does not match the model's input tensor "
                      f"{facts.input_hw[0]}x{facts.input_hw[1]}")
    _check_preprocess(meta.get("preprocess"), facts)
    labels = meta.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise Invalid("meta labels must be a list of strings")
    classes = _classes(meta["task"], meta.get("head"), facts)
    if labels and classes is not None and len(labels) != classes:
        raise Invalid(f"{len(labels)} labels for the model's {classes} classes")


def _check_preprocess(pre, facts) -> None:
    if not isinstance(pre, dict):
        raise Invalid("meta preprocess must be an object with mean, std and letterbox")
    for key in ("mean", "std"):
        values = pre.get(key)
        if not (isinstance(values, list) and len(values) == 3 and all(is_number(x) for x in values)):
            raise Invalid(f"meta preprocess {key} {one_line(repr(values), 60)}: expected 3 finite numbers")
    if any(x <= 0 for x in pre["std"]):
        raise Invalid(f"meta preprocess std {pre['std']}: every value must be > 0")
    letterbox = pre.get("letterbox", False)
    if not isinstance(letterbox, bool):
        raise Invalid(f"meta preprocess letterbox {one_line(repr(letterbox), 60)} is not true or false")
    if letterbox and facts.input_dtype == np.uint8:
        raise Invalid("a letterboxing model needs float input (its grey, 127.5, is no uint8 value)")


def _classes(task: str, head, facts) -> int | None:
    """The number of classes the model's outputs imply, when they say (a raw model's never do: its labels,
    if any, are not checked against its outputs)."""
    if task == "raw":
        return None
    first = facts.output_shapes[0]
    if task == "detection":
        return _detection_classes(head, facts)
    if task == "classification" and first and first[0] == 1:
        return math.prod(first[1:])
    if task == "segmentation" and len(first) == 4:
        return first[3]
    return None


def _detection_classes(head, facts) -> int:
    """YOLO head maps (`processing.Processor` pairs them, by growing grid, with `head["strides"]`):
    each map H/s x W/s with len(mask) * (5 + C) channels; returns C."""
    anchors, masks, strides = (head.get(k) if isinstance(head, dict) else None for k in ("anchors", "masks", "strides"))
    if not (isinstance(anchors, list) and anchors and all(
            isinstance(a, list) and len(a) == 2 and all(is_number(v) and v > 0 for v in a) for a in anchors)):
        raise Invalid("detection meta head anchors: expected a list of [width, height] > 0")
    if not (isinstance(masks, list) and isinstance(strides, list)
            and len(masks) == len(strides) == len(facts.output_shapes)
            and all(isinstance(m, list) and m and all(is_int(i) and 0 <= i < len(anchors) for i in m) for m in masks)
            and all(is_int(s) and s > 0 for s in strides)):
        raise Invalid(f"detection meta head: masks (anchor indices) and strides for each of the model's "
                      f"{len(facts.output_shapes)} outputs expected")
    classes = set()
    maps = sorted(facts.output_shapes, key=lambda s: s[1] if len(s) == 4 else -1)
    for shape, mask, stride in zip(maps, masks, strides):
        if len(shape) != 4 or (shape[1] * stride, shape[2] * stride) != facts.input_hw or shape[3] % len(mask) \
                or shape[3] // len(mask) < 6:
            raise Invalid(f"detection output {shape} does not fit stride {stride} and {len(mask)} anchors on input "
                          f"{facts.input_hw[0]}x{facts.input_hw[1]}")
        classes.add(shape[3] // len(mask) - 5)
    if len(classes) != 1:
        raise Invalid(f"detection outputs disagree on the number of classes ({sorted(classes)})")
    return classes.pop()


def check_layer_entries(entries) -> list[dict]:
    """The meta's layer records: their fields, types and unique names (docs/DESIGN.md)."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) and set(e) == _LAYER_KEYS for e in entries):
        raise Invalid(f"meta layers must be a list of records with the fields {', '.join(sorted(_LAYER_KEYS))}")
    names = []
    for e in entries:
        name, bn = e["name"], e["bn"]
        named = isinstance(name, str) and name and (bn is None or isinstance(bn, str) and bn)
        if not named or e["kind"] not in KINDS:
            raise Invalid(f"layer record {one_line(repr(e), 120)}: name, kind ({'/'.join(KINDS)}) or bn is wrong")
        if not is_int(e["w_buffer"]) or not (e["b_buffer"] is None or is_int(e["b_buffer"])):
            raise Invalid(f"layer {name!r}: w_buffer/b_buffer must be buffer indices")
        if bn is not None and (not is_number(e["eps"]) or e["eps"] <= 0 or e["b_buffer"] is None):
            raise Invalid(f"layer {name!r}: a layer with a BN needs eps > 0 and a bias buffer")
        if e["kind"] == "affine" and bn != name:
            raise Invalid(f"layer {name!r}: an affine record is its BN (name and bn must be the same)")
        names += [name] + ([bn] if bn and bn != name else [])
    if len(set(names)) != len(names):
        raise Invalid("meta layers: a layer or BN name is used twice")
    return entries


def check_noise_layers(chosen, entries: list[dict]) -> None:
    """meta["noise_layers"] (optional): the layers noise targets, each a layer record holding a weight."""
    if chosen is None:
        return
    weights = {e["name"] for e in entries if e["kind"] in WEIGHT_KINDS}
    if not (isinstance(chosen, list) and all(isinstance(n, str) and n in weights for n in chosen)):
        raise Invalid(f"meta noise_layers {one_line(repr(chosen), 120)}: expected names of conv, depthwise, "
                      "dense or transposed-conv layers of the sidecar")


def check_calibration_entry(cal, entries: list[dict]) -> None:
    """meta["calibration"]: a calibration variant's bare file name, its BNs (= the layers' BNs, in order)
    and buffer indices for every layer (checked against the variant's own file when it is loaded)."""
    file = cal.get("file") if isinstance(cal, dict) else None
    if not (isinstance(file, str) and file.endswith(".tflite") and "/" not in file and "\\" not in file
            and not file.startswith(".")):
        raise Invalid(f"meta calibration file {one_line(repr(file), 80)} is not a .tflite file name")
    if cal.get("bns") != [e["bn"] for e in entries if e["bn"]]:
        raise Invalid("meta calibration bns do not list the layers' BNs in order")
    buffers = cal.get("buffers")
    if not (isinstance(buffers, dict) and set(buffers) == {e["name"] for e in entries} and all(
            isinstance(b, list) and len(b) == 2 and is_int(b[0]) and (b[1] is None or is_int(b[1]))
            for b in buffers.values())):
        raise Invalid("meta calibration buffers must give [kernel, bias] buffer indices for every layer")


def check_sweep_entry(sweep, entries: list[dict], rows: int) -> None:
    """meta["sweep"]: as a calibration entry (file, BNs, buffers), plus a state buffer index for every BN
    and the rows each state holds (checked against the variant's own file when it is loaded)."""
    check_calibration_entry(sweep, entries)
    states = sweep.get("states")
    if not (isinstance(states, dict) and set(states) == {e["bn"] for e in entries if e["bn"]}
            and all(isinstance(b, list) and len(b) == rows and all(is_int(i) for i in b) for b in states.values())):
        raise Invalid(f"meta sweep states must give {rows} buffer indices for every BN")
    if sweep.get("rows") != rows:
        raise Invalid(f"meta sweep rows {one_line(repr(sweep.get('rows')), 40)}: this edge-cbn writes {rows}")


# -------------------------------------------------------------------------------- sidecar arrays
def kernel_out_channels(kind: str, shape: tuple) -> int:
    """Output channels of a Keras-layout kernel: conv HWIO, depthwise/affine HWCM (C*M), dense IO,
    transposed conv HWOI."""
    if kind in ("depthwise", "affine"):
        return shape[-2] * shape[-1]
    return shape[-2] if kind == "transpose" else shape[-1]


def kernel_shape(members: NpzMembers, entry: dict) -> tuple:
    """A layer's kernel shape from its header: the rank its kind needs, every dimension >= 1."""
    name = f"{entry['name']}/kernel"
    shape, _ = members.header(name)
    if len(shape) != _KERNEL_NDIM[entry["kind"]] or min(shape) < 1:
        raise Invalid(f"array {name!r} has shape {shape}, not a {entry['kind']} kernel")
    return shape


def check_layer_buffers(layers, facts, mismatch: str = "the sidecar belongs to another model") -> None:
    """Each layer's buffers exist in the model, are not shared, and hold exactly a float32 kernel of its
    shape and a bias per output channel: a sidecar of another model fails here (`mismatch` says so).
    `layers`: (name, kind, Keras kernel shape, kernel buffer, bias buffer or None)."""
    used, sizes = {}, facts.buffer_sizes
    for name, kind, shape, w_buffer, b_buffer in layers:
        needs = (4 * math.prod(shape), 4 * kernel_out_channels(kind, shape))  # Python ints: no wrap-around
        for what, index, nbytes in (("kernel", w_buffer, needs[0]), ("bias", b_buffer, needs[1])):
            if index is None:
                continue
            if not 0 <= index < len(sizes):
                raise Invalid(f"layer {name!r}: {what} buffer {index} does not exist (the model has {len(sizes)}): "
                              f"{mismatch}")
            if index in used:
                raise Invalid(f"buffer {index} is shared by layers {used[index]!r} and {name!r}: {mismatch}")
            used[index] = name
            if sizes[index] != nbytes:
                raise Invalid(f"layer {name!r}: {what} buffer {index} has {sizes[index]} bytes, a float32 {what} "
                              f"for kernel {shape} has {nbytes}: {mismatch}")


def sidecar_specs(entries: list[dict], shapes: dict) -> dict:
    """{member: ArraySpec} of a sidecar: meta, each layer's float32 kernel (of the shape its header gave,
    already checked against the model) and optional bias, each BN's optional gamma/beta and mean/var."""
    specs = {"meta": ArraySpec("U", ((),))}
    for e in entries:
        shape = shapes[e["name"]]
        channel = ((kernel_out_channels(e["kind"], shape),),)
        specs[f"{e['name']}/kernel"] = ArraySpec("f", (shape,), (4,))
        specs[f"{e['name']}/bias"] = ArraySpec("f", channel, (4,), optional=True)
        for field in ("gamma", "beta", "mean", "var") if e["bn"] else ():
            specs[f"{e['bn']}/{field}"] = ArraySpec("f", channel, (4,), optional=field in ("gamma", "beta"))
    return specs


def check_layer_arrays(name: str, bn: str | None, arrays: dict) -> None:
    """A layer's arrays ({"kernel", "bias", "gamma", "beta", "mean", "var"}, present ones) are finite and
    its BN variance is >= 0."""
    for key, value in arrays.items():
        if value is not None and not all_finite(value):
            raise Invalid(f"{name if key in ('kernel', 'bias') else bn}/{key} holds non-finite values (NaN or Inf)")
    if bn:
        check_bn_stats(bn, arrays["mean"], arrays["var"])
