"""A model of the user's own (a saved Keras file, or a keras.applications architecture) and what using it
needs: the input size, the preprocessing, the task and the labels, read from the model where it says
them and from flags otherwise (`tools/convert.py --keras`, `edge-cbn models --keras`).

    export_own_model("mine.keras", "mine.tflite", labels=["circle", "square", "triangle"])
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path

import numpy as np

from ..runtime import fold
from ..runtime.labels import load_labels
from ..runtime.validation import regular_file
from .build import export_model
from .keras_fold import fold_plan
from .keras_graph import GraphError, flat_model
from .models import ModelSpec
from .tf_import import keras
from .weights.assign import layer_kind

KERAS_FILE_SUFFIXES = (".keras", ".h5", ".hdf5")
APPLICATIONS_PREFIX = "keras.applications."
# keras.applications' preprocess_input modes (keras/src/applications/imagenet_utils.py), in this project's
# pixel units: the model input is (rgb - mean) / std.  "caffe" also wants BGR, which `_rgb_first_conv`
# folds into the first convolution.  Every other architecture normalises inside its graph.
_TF_MODE = {"mean": [127.5] * 3, "std": [127.5] * 3, "letterbox": False}
_TORCH_MODE = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "letterbox": False}
_CAFFE_MODE = {"mean": [123.68, 116.779, 103.939], "std": [1.0] * 3, "letterbox": False}
_IN_GRAPH = {"mean": [0.0] * 3, "std": [1.0] * 3, "letterbox": False}
_APPLICATION_MODES = {
    **dict.fromkeys(("MobileNet", "MobileNetV2", "InceptionV3", "InceptionResNetV2", "Xception", "NASNetMobile",
                     "NASNetLarge", "ResNet50V2", "ResNet101V2", "ResNet152V2"), _TF_MODE),
    **dict.fromkeys(("DenseNet121", "DenseNet169", "DenseNet201"), _TORCH_MODE),
    **dict.fromkeys(("ResNet50", "ResNet101", "ResNet152", "VGG16", "VGG19"), _CAFFE_MODE),
}
_INPUT_LAYERS = ("Rescaling", "Normalization")
TASKS = ("classification", "segmentation", "detection", "raw")


class OwnModelError(ValueError):
    """A model, or a flag about it, that edge-cbn cannot use; the message names what and why."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def load_keras_file(path) -> "keras.Model":
    """The Keras model saved at `path` (.keras or .h5), flat (`keras_graph.flat_model`).

    Raises:
        OwnModelError: a missing or unreadable file, a SavedModel folder, a file Keras cannot load (an
            unknown custom layer, a Lambda layer: the message is Keras's first line), a subclassed model.
    """
    path = Path(path)
    if path.is_dir():
        raise OwnModelError(f"{path}: a SavedModel folder, which Keras 3 loads only as an opaque layer "
                            "(keras.layers.TFSMLayer), not as layers edge-cbn can fold: save the model with "
                            "model.save('model.keras') and convert that")
    if path.suffix.lower() not in KERAS_FILE_SUFFIXES:
        raise OwnModelError(f"{path}: expected a Keras model file ({', '.join(KERAS_FILE_SUFFIXES)})")
    regular_file(path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises ValueError, TypeError, OSError, KeyError... for files it cannot read
        raise OwnModelError(f"{path}: Keras cannot load it: {_first_line(e)}") from None
    return _flat(model, path.stem)


def _flat(model, what, input_hw=None, skip=()) -> "keras.Model":
    try:
        return flat_model(model, input_hw, skip)
    except GraphError as e:
        raise OwnModelError(f"{what}: {e}") from None


def keras_application(name: str, *, weights=None, random_weights=False, input_size=None, num_classes=None):
    """(flat model, preprocessing) of keras.applications architecture `name` ("MobileNetV2" or
    "keras.applications.MobileNetV2"), with the weight file Keras publishes for it, or random weights.

    Raises:
        OwnModelError: an unknown name, no weight file without `random_weights`, a file that does not fit.
    """
    short = name[len(APPLICATIONS_PREFIX):] if name.startswith(APPLICATIONS_PREFIX) else name
    builder = getattr(keras.applications, short, None)
    if not short[:1].isupper() or not callable(builder):
        known = ", ".join(n for n in dir(keras.applications) if n[:1].isupper())
        raise OwnModelError(f"unknown keras.applications model {short!r}; known: {known}")
    if weights is None and not random_weights:
        raise OwnModelError(f"{short} needs its weight file: pass --weights FILE (the .h5 file Keras publishes; "
                            "nothing is downloaded at run time) or --random-weights")
    if weights is not None:
        regular_file(weights)
    options = {"weights": None if weights is None else str(weights)}
    if input_size:
        options["input_shape"] = (input_size, input_size, 3)
    if num_classes:
        options["classes"] = num_classes
    try:
        model = builder(**options)
    except Exception as e:  # a weight file of another architecture, an input size it refuses
        raise OwnModelError(f"keras.applications.{short}: {_first_line(e)}") from None
    preprocess = _APPLICATION_MODES.get(short, _IN_GRAPH)
    if preprocess is _CAFFE_MODE:
        _rgb_first_conv(model)
    return _flat(model, short), dict(preprocess)


def _rgb_first_conv(model) -> None:
    """Reverse the input channels of the first convolution, so that a model trained on BGR input (caffe
    mode) takes RGB: exact, the padding's zeros stay zeros."""
    first = next(layer for layer in model.layers if layer_kind(layer) == "conv")
    kernel, *rest = first.get_weights()
    first.set_weights([kernel[:, :, ::-1, :], *rest])


@dataclasses.dataclass
class OwnModel:
    """A user's model and what using it needs (the sidecar's meta), as `describe` finds them."""
    name: str
    model: object  # flat keras.Model
    input_hw: tuple
    preprocess: dict
    task: str
    labels: list
    head: dict | None = None
    notes: list = dataclasses.field(default_factory=list)  # how each fact was found, for the user


def describe(model, *, name: str, preprocess: dict | None = None, task: str | None = None, labels_file=None,
             head_file=None, input_size=None, mean=None, std=None, input_range=None,
             need_preprocess: bool = True, labels: list | None = None, head: dict | None = None) -> OwnModel:
    """What using flat `model` needs: each fact from the flags when given, else from the model.

    Args:
        model: a flat Keras model (`load_keras_file`, `keras_application`).
        name: the model's name in the sidecar.
        preprocess: the preprocessing when it is known already (keras.applications).
        task: "classification", "segmentation", "detection" or "raw"; None: from the outputs.
        labels_file: a text file with one class name a line.
        head_file: a detector's head spec (JSON: anchors, masks, strides; docs/DESIGN.md).
        input_size: int or (H, W), for a model whose input size is free.
        mean, std: per-channel pixel mean and std ("r,g,b", one number, or a list), the input being
            (rgb - mean) / std.
        input_range: (low, high), the range the model wants the pixels 0..255 mapped to.
        need_preprocess: False leaves an unknown preprocessing None (a note says so) instead of raising.
        labels, head: the class names and the head spec themselves, instead of their files.

    Returns:
        The `OwnModel`.

    Raises:
        OwnModelError: a fact that can be neither read nor was given, or a flag that contradicts the model.
    """
    notes = []
    hw = _input_hw(model, input_size)
    try:
        preprocess, taken = _preprocess(model, preprocess, mean, std, input_range, notes)
    except OwnModelError as e:
        if need_preprocess or input_range is not None or mean is not None or std is not None:
            raise
        preprocess, taken = None, []
        notes.append(f"preprocessing: unknown ({str(e).split(': ', 1)[1]})")
    free = tuple(model.input_shape[1:3]) != hw  # a free input size, fixed for the converter and calibration
    if free or taken:  # one rebuild for both
        model = _flat(model, name, hw if free else None, skip=taken)
    task = _task(model, hw, task, head_file or head, notes)
    head = (head or _head(head_file)) if task == "detection" else None
    labels = _labels(model, task, labels_file, notes, labels)
    return OwnModel(name, model, hw, preprocess, task, labels, head, notes)


def _input_hw(model, input_size) -> tuple:
    if len(model.inputs) != 1 or len(model.input_shape) != 4:
        raise OwnModelError(f"{model.name}: edge-cbn feeds one image (N, H, W, 3); the model's inputs are "
                            f"{[tuple(t.shape) for t in model.inputs]}")
    if model.input_shape[-1] != 3:
        raise OwnModelError(f"{model.name}: the model takes {model.input_shape[-1]} channels; camera frames are RGB (3)")
    h, w = model.input_shape[1:3]
    wanted = (input_size, input_size) if isinstance(input_size, int) else input_size and tuple(input_size)
    if h is None or w is None:
        if wanted is None:
            raise OwnModelError(f"{model.name}: the model's input size is free ({h}x{w}): give --input-size")
        return wanted
    if wanted is not None and wanted != (h, w):
        raise OwnModelError(f"{model.name}: the model's input is {h}x{w}, not the --input-size {wanted[0]}x{wanted[1]}")
    return h, w


def _preprocess(model, known, mean, std, input_range, notes) -> tuple[dict, list]:
    """(preprocessing, names of the input layers it takes in): from the flags, keras.applications' mode,
    and the Rescaling/Normalization layers the input passes through first.  Those layers leave the graph
    for the preprocessing (the converter would fuse their multiply into the first convolution's kernel,
    which then could not be refolded)."""
    chain = _input_chain(model)
    if input_range is not None:
        low, high = input_range
        if not high > low:
            raise OwnModelError(f"--input-range {low} {high}: the high end must be above the low one")
        scale = 255.0 / (high - low)
        base, said = {"mean": [-low * scale] * 3, "std": [scale] * 3}, f"pixels 0..255 mapped to {low:g}..{high:g} (--input-range)"
    elif mean is not None or std is not None:
        base = {"mean": _three(mean or [0.0], "--mean"), "std": _three(std or [1.0], "--std")}
        if min(base["std"]) <= 0:
            raise OwnModelError(f"--std {base['std']}: every value must be > 0")
        said = "(rgb - mean) / std (--mean/--std)"
    elif known is not None:
        base, said = known, "keras.applications' preprocess_input"
    elif chain:
        base, said = _IN_GRAPH, "fed pixels 0..255"
    else:
        raise OwnModelError(f"{model.name}: the model has no Rescaling or Normalization layer, so the input it "
                            "expects is unknown: give --input-range (e.g. 0 1 or -1 1) or --mean and --std")
    scale = 1.0 / np.asarray(base["std"], np.float64)  # the input so far: rgb * scale + shift
    shift = -np.asarray(base["mean"], np.float64) * scale
    for layer in chain:
        a, b = _affine_of(layer)
        scale, shift = a * scale, a * shift + b
    if not np.all(scale > 0):
        raise OwnModelError(f"{model.name}: the input layers {[l.name for l in chain]} scale a channel by a "
                            "negative or zero factor, which edge-cbn's preprocessing cannot express")
    pre = {"mean": [float(v) for v in -shift / scale], "std": [float(v) for v in 1.0 / scale], "letterbox": False}
    taken = f"; with the model's {', '.join(repr(l.name) for l in chain)}" if chain else ""
    notes.append(f"preprocessing: {said}{taken}: (rgb - {_short(pre['mean'])}) / {_short(pre['std'])}")
    return pre, [layer.name for layer in chain]


def _short(values) -> str:
    return "[" + ", ".join(f"{v + 0.0:.6g}" for v in values) + "]"


def _three(values, flag) -> list:
    """3 floats from "x" or "r,g,b" (or a list of numbers)."""
    if isinstance(values, str):
        try:
            values = [float(v) for v in values.split(",")]
        except ValueError:
            raise OwnModelError(f"{flag} {values!r}: expected numbers, e.g. 127.5 or 123.7,116.3,103.5") from None
    values = [float(v) for v in values]
    if not all(np.isfinite(values)):
        raise OwnModelError(f"{flag}: every value must be a finite number")
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise OwnModelError(f"{flag}: give one value or three (R, G, B), not {len(values)}")
    return values


def _input_chain(model) -> list:
    """The Rescaling/Normalization layers the input passes through first, in order, each the only user of
    the one before."""
    chain, op = [], model.inputs[0]._keras_history.operation
    while len(op._outbound_nodes) == 1:
        op = op._outbound_nodes[0].operation
        if type(op).__name__ not in _INPUT_LAYERS:
            break
        chain.append(op)
    return chain


def _affine_of(layer) -> tuple:
    """(a, b), 3 values each: the layer computes x * a + b per channel."""
    if type(layer).__name__ == "Rescaling":
        a, b = layer.scale, layer.offset
    else:
        if layer.invert:
            raise OwnModelError(f"Normalization {layer.name!r} inverts (invert=True): not an input normalisation")
        d = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)), keras.config.epsilon())
        a, b = 1.0 / d, -np.asarray(layer.mean, np.float64) / d
    try:
        return tuple(np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (3,)) for v in (a, b))
    except ValueError:
        raise OwnModelError(f"{type(layer).__name__} {layer.name!r}: its factors do not fit 3 channels") from None


def _outputs(model) -> list:
    return [tuple(t.shape) for t in model.outputs]


def _task(model, hw, task, head_file, notes) -> str:
    """The task the flag names (checked against the outputs), else the one the outputs imply."""
    shapes = _outputs(model)
    one = shapes[0] if len(shapes) == 1 else None
    classes = one is not None and len(one) == 2 and (one[1] or 0) >= 2
    per_pixel = one is not None and len(one) == 4 and tuple(one[1:3]) == tuple(hw) and (one[3] or 0) >= 2
    if task is None:
        task = "detection" if head_file else "classification" if classes else "segmentation" if per_pixel else "raw"
        why = {"classification": f"its output {one} is a class vector",
               "segmentation": f"its output {one} holds per-pixel class scores at the input size",
               "detection": "a head spec was given (--head)",
               "raw": f"edge-cbn does not interpret its outputs {shapes}: agreement is their cosine similarity"}
        notes.append(f"task: {task} ({why[task]}; --task to choose)")
        return task
    if task not in TASKS:
        raise OwnModelError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if task == "classification" and not classes:
        raise OwnModelError(f"--task classification needs one (N, classes) output; the model's are {shapes}")
    if task == "segmentation" and not (one is not None and len(one) == 4 and (one[3] or 0) >= 2):
        raise OwnModelError(f"--task segmentation needs one (N, H, W, classes) output; the model's are {shapes}")
    if task == "detection" and not head_file:
        raise OwnModelError("--task detection needs the head spec: --head FILE (docs/DESIGN.md, 'Your own model')")
    notes.append(f"task: {task} (--task)")
    return task


def _head(head_file) -> dict:
    """A YOLO head spec: {"anchors": [[w, h], ...], "masks": [[anchor indices], ...], "strides": [...]}
    (checked against the outputs when the exported bundle loads)."""
    regular_file(head_file)
    try:
        head = json.loads(Path(head_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OwnModelError(f"--head {head_file}: not a readable JSON file: {_first_line(e)}") from None
    if not (isinstance(head, dict) and {"anchors", "masks", "strides"} <= set(head)):
        raise OwnModelError(f"--head {head_file}: expected a JSON object with anchors, masks and strides")
    return {k: head[k] for k in ("anchors", "masks", "strides")}


def _labels(model, task, labels_file, notes, given=None) -> list:
    shape = _outputs(model)[0]
    count = shape[-1] if task in ("classification", "segmentation") else None
    if given is not None:
        if count is not None and len(given) != count:
            raise OwnModelError(f"{len(given)} labels for the model's {count} classes")
        notes.append(f"labels: {len(given)} given")
        return [str(x) for x in given]
    if labels_file is not None:
        regular_file(labels_file)
        try:
            labels = [line.strip() for line in Path(labels_file).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise OwnModelError(f"--labels {labels_file}: not a readable UTF-8 text file: {_first_line(e)}") from None
        labels = [x for x in labels if x]
        if count is not None and len(labels) != count:
            raise OwnModelError(f"--labels {labels_file}: {len(labels)} names for the model's {count} classes")
        notes.append(f"labels: {len(labels)} from {labels_file}")
        return labels
    if count == 1000 and task == "classification":
        notes.append("labels: the 1000 ImageNet classes (the output has 1000; --labels to name them otherwise)")
        return load_labels("imagenet")
    if count is None:
        return []
    notes.append(f"labels: 'class 0' .. 'class {count - 1}' (--labels FILE to name them)")
    return [f"class {i}" for i in range(count)]


def select_noise_layers(model, pattern: str | None) -> list | None:
    """The names of the weight layers that `pattern` chooses: comma-separated shell patterns, each matched
    against a layer's name, its kind (conv, depthwise, dense, transpose) and its Keras class.  None: every
    weight layer (the default, left unnamed in the sidecar).

    Raises:
        OwnModelError: a pattern that chooses no weight layer.
    """
    if pattern is None:
        return None
    layers = [(l.name, layer_kind(l), type(l).__name__) for l in model.layers if layer_kind(l) in fold.WEIGHT_KINDS]
    chosen = []
    for part in (p.strip() for p in pattern.split(",")):
        hits = [name for name, kind, cls in layers if any(fnmatch.fnmatchcase(v, part) for v in (name, kind, cls))]
        if not part or not hits:
            raise OwnModelError(f"--noise-layers {part!r} matches no conv, depthwise, dense or transposed-conv "
                                "layer (`edge-cbn models --keras FILE` lists them)")
        chosen += [n for n in hits if n not in chosen]
    order = [name for name, _, _ in layers]
    return sorted(chosen, key=order.index)


def report(own: OwnModel, noise_layers: list | None = None) -> list[str]:
    """What `edge-cbn models --keras` prints: the input, preprocessing, task, labels, every BatchNorm
    (folded into which layer, or kept as its own affine) and the noise targets."""
    plan = fold_plan(own.model)
    folded = [(bn.name, layer.name) for layer, kind, bn in plan if bn is not None and kind != "affine"]
    affine = [bn.name for _, kind, bn in plan if kind == "affine"]
    targets = [layer.name for layer, kind, _ in plan if kind != "affine"
               and (noise_layers is None or layer.name in noise_layers)]
    lines = [f"model: {own.name} ({len(own.model.layers)} layers, {own.model.count_params() / 1e6:.2f}M parameters)",
             f"input: {own.input_hw[0]}x{own.input_hw[1]}x3", *own.notes,
             f"BatchNorm: {len(folded)} folded into the layer before, {len(affine)} kept as a per-channel affine"]
    lines += [f"  {bn} -> folded into {layer}" for bn, layer in folded]
    lines += [f"  {bn} -> affine (follows no layer it can fold into)" for bn in affine]
    if not folded and not affine:
        lines.append("  none: nothing to calibrate (the model streams under noise as it is)")
    lines.append(f"noise targets: {len(targets)} layers" + (" (--noise-layers)" if noise_layers is not None else ""))
    lines += [f"  {name}" for name in targets]
    return lines


def spec_of(own: OwnModel):
    """The registry's `ModelSpec` for `own`, as `build.export_model` and offline calibration read it."""
    return ModelSpec(own.name, None, own.input_hw[0], own.task, "keras", own.preprocess, tuple(own.labels),
                     len(own.labels), head=own.head)


def export_own_model(model, path, *, name: str | None = None, noise_layers: str | None = None,
                     calibration: bool = True, **facts) -> Path:
    """Convert a Keras model of your own (in memory, or a .keras/.h5 file) into a bundle that `edge-cbn
    stream` and `CalibratedModel` run and calibrate: what `tools/convert.py --keras FILE` does.

    Args:
        model: a functional or Sequential Keras model, or the path of one saved.
        path: the .tflite to write (its sidecar and calibration variant go beside it).
        name: the model's name in the sidecar (default: the model's).
        noise_layers: which layers noise acts on, as `--noise-layers` (None: every conv and dense kernel).
        calibration: also write the calibration and sweep variants (False: a model that serves as it is,
            converted in a third of the time).
        **facts: what the model does not say itself, as `describe` takes them: `labels=[...]`, `task=`,
            `input_range=(low, high)`, `mean=`/`std=`, `input_size=`, `head={...}`.

    Returns:
        The .tflite path.

    Raises:
        OwnModelError: a model or fact that cannot be used (the message names it).
        FoldError, GraphError, ExportError: a layer that cannot be exported (the message names it).
    """
    if isinstance(model, (str, Path)):
        model, name = load_keras_file(model), name or Path(model).stem
    else:
        model = _flat(model, model.name)
    own = describe(model, name=name or model.name, **facts)
    return export_model(spec_of(own), own.model, path, noise_layers=select_noise_layers(own.model, noise_layers),
                        input_as_conv=True, calibration=calibration)
