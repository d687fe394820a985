"""Workstation side: fold every BatchNorm into the conv/depthwise/dense layer before it, convert to a
float32 TFLite model and write the bundle `X.tflite` + `X.cbn.npz` (docs/DESIGN.md).

Locating the folded tensors in the flatbuffer: the TFLite converter deduplicates identical constant
buffers and drops all-zero biases, so matching the real folded values could be ambiguous.  Instead the
model is converted with unique random *sentinel* weights in every conv/depthwise/dense layer, each
layer's buffers are found by exact byte match of its sentinels (in TFLite layout), and the real folded
values are then written into them by `edge_cbn.runtime.refold.Refolder` — the same code path as on-device
refolding, so export and refold produce identical bytes.  A final check runs the `.tflite` against the
folded Keras model, which also fixes the output order to the Keras one.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections import defaultdict
from pathlib import Path

from .tf_import import keras, tf
import numpy as np
import tflite

from ..runtime import fold
from ..runtime.bundle import (FORMAT, Bundle, atomic_write, buffer_span, calibration_path, sha256,
                              sidecar_path, sweep_path, write_sidecar)
from ..runtime.sweep import SWEEP_ROWS
from ..runtime.flatbuffer import model_facts
from ..runtime.interpreter import io_indices, make_interpreter, run_interpreter
from ..runtime.processing import normalise
from ..runtime.native_log import silenced
from ..runtime.refold import Refolder
from ..runtime.validation import Invalid, check_meta
from .keras_fold import ChannelAffine, fold_keras
from .keras_graph import flat_model, needs_flattening
from .sweep import sweep_model

class ExportError(ValueError):
    """A model the TFLite converter cannot convert, or whose folded tensors it rewrote; the message names
    the layer."""


class _DropDeprecationNote(logging.Filter):
    """Hides TF's note that `from_concrete_functions` without a trackable object is deprecated: that
    path freezes the variables itself and converts about twice as fast as the SavedModel one."""

    def filter(self, record):
        return "trackable_obj" not in record.getMessage()


def convert_keras(model, input_hw: tuple[int, int] | None = None) -> bytes:
    """Float32 TFLite flatbuffer of `model` with a fixed (1, H, W, C) input of the model's input dtype
    (no BN folding here)."""
    h, w = input_hw or model.input_shape[1:3]
    if h is None or w is None:
        raise ValueError("the model has a free spatial input size: pass input_size")
    spec = tf.TensorSpec((1, h, w, model.input_shape[-1]), model.inputs[0].dtype, name="input")
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    quiet = _DropDeprecationNote()
    logging.getLogger("absl").addFilter(quiet)
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        with silenced():  # the converter's MLIR notices
            try:
                return converter.convert()
            except Exception as e:  # ConverterError and friends: one line naming the op and its layer
                raise ExportError(f"LiteRT cannot run this model: {converter_problem(e, model)}") from None
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def converter_problem(error: Exception, model) -> str:
    """The converter's complaint in one line: the TensorFlow op LiteRT lacks and the layer that uses it."""
    text = str(error)
    missing = re.search(r"'tf\.(\w+)' op is neither a custom op nor a flex op", text)
    if missing:
        op = missing.group(1)
        layer = layer_using_op(model, op)
        where = f"layer {layer.name!r} ({type(layer).__name__})" if layer else "a layer"
        return f"{where} uses the TensorFlow op {op}, which is not among LiteRT's built-in ops"
    errors = [line.split("error:", 1)[1].strip() for line in text.splitlines() if "error:" in line]
    return (errors[0] if errors else text.strip().splitlines()[0] if text.strip() else type(error).__name__)[:300]


def layer_using_op(model, op_type: str):
    """The first layer of `model` (nested models searched inside) whose computation holds a TensorFlow op of
    type `op_type` (traced one layer at a time, so only when a conversion failed), or None."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner = layer_using_op(layer, op_type)
            if inner is not None:
                return inner
            continue
        nodes = getattr(layer, "_inbound_nodes", [])
        if not nodes or not nodes[0].input_tensors or isinstance(layer, keras.layers.InputLayer):
            continue
        node = nodes[0]
        specs = [tf.TensorSpec((1, *t.shape[1:]), t.dtype) for t in node.input_tensors]

        def run(*xs, node=node, layer=layer):
            args, kwargs = node.arguments.fill_in({id(t): x for t, x in zip(node.input_tensors, xs)})
            return layer(*args, **kwargs)
        try:
            graph = tf.function(run).get_concrete_function(*specs).graph
        except Exception:  # a layer that does not trace alone: not the one to name
            continue
        if any(op.type == op_type for op in graph.get_operations()):
            return layer
    return None


def with_raw_input(model, preprocess: dict, as_conv: bool = False) -> keras.Model:
    """`model` behind an RGB uint8 input normalised in the graph, (x - mean) / std as
    `runtime.normalise` does: the device then feeds resized camera pixels as they are (a quarter of
    the bytes of float input, no normalisation pass in Python).  `as_conv` computes it as a 1x1
    depthwise convolution instead, x * (1/std) - mean/std: the converter fuses a multiply into a first
    convolution that follows it directly (no padding layer between), whose kernel then holds no longer
    the weights the sidecar locates."""
    inp = keras.Input(model.input_shape[1:], dtype="uint8", name="rgb")
    x = keras.ops.cast(inp, "float32")
    mean, std = np.float32(preprocess["mean"]), np.float32(preprocess["std"])
    if not as_conv:
        return keras.Model(inp, model((x - mean) / std))
    normalise_layer = ChannelAffine(name="input_normalisation")
    out = model(normalise_layer(x))
    normalise_layer.set_weights([(1 / std).reshape(1, 1, -1, 1), -mean / std])
    return keras.Model(inp, out)


def _convert_with_sentinels(folded, records, input_hw, graph=None, constants=None) -> tuple[bytes, dict, list]:
    """Convert `graph` (default `folded`, whose layers it uses) with unique random weights in every
    recorded layer of `folded`, locate each layer's kernel and bias buffers by exact byte match and
    restore the real weights; returns the sentinel model, {layer name: (w_buffer, b_buffer)} and the
    layers without BN whose kernel the converter rewrote (a constant multiply after the conv fused into
    it, as InceptionResNetV2's residual scale).  A layer without BN keeps its real bias and no bias buffer
    is located for it (b_buffer None: refold never writes it, and the converter may have fused a
    constant that follows into it, as MobileNetV3's hard-sigmoid `+ 3` after a squeeze-excite conv).
    `constants` ({key: Keras variable}, the sweep variant's states) get sentinels too; their buffers come
    back in the dict under their keys."""
    rng = np.random.default_rng(0)
    real, sentinels = {}, {}
    constants = constants or {}
    real_constants = {key: np.array(var.numpy()) for key, var in constants.items()}
    for key, var in constants.items():
        var.assign(rng.standard_normal(var.shape).astype(np.float32))
    for rec in records:
        layer = folded.get_layer(rec.name)
        real[rec.name] = layer.get_weights()
        kernel, *bias = real[rec.name]
        sentinels[rec.name] = [rng.standard_normal(kernel.shape).astype(np.float32)] + (
            [rng.standard_normal(b.shape).astype(np.float32) for b in bias] if rec.bn else bias)
        layer.set_weights(sentinels[rec.name])
    try:
        model_bytes = convert_keras(folded if graph is None else graph, input_hw)
    finally:
        for name, weights in real.items():
            folded.get_layer(name).set_weights(weights)
        sentinel_constants = {key: np.array(var.numpy()) for key, var in constants.items()}
        for key, var in constants.items():
            var.assign(real_constants[key])

    model = tflite.Model.GetRootAs(model_bytes, 0)
    data = memoryview(model_bytes)
    by_size = defaultdict(list)
    for i in range(model.BuffersLength()):
        start, size = buffer_span(model_bytes, i, model)
        if size:
            by_size[size].append((i, start))

    def find(arr, what, needed=True):
        needle = np.ascontiguousarray(arr, np.float32).tobytes()
        hits = [i for i, start in by_size[len(needle)] if data[start:start + len(needle)] == needle]
        if len(hits) != 1 and needed:
            raise ExportError(f"{what}: found in {len(hits)} TFLite buffers, expected exactly one (the "
                              "converter rewrote or fused this tensor; it cannot be refolded)")
        return hits[0] if len(hits) == 1 else None

    buffers, rewritten = {}, []
    for rec in records:
        kernel, *bias = sentinels[rec.name]
        w = find(fold.to_tflite(rec.kind, kernel), f"layer {rec.name!r} kernel", needed=bool(rec.bn))
        if w is None:
            rewritten.append(rec.name)
            continue
        buffers[rec.name] = (w, find(bias[0], f"layer {rec.name!r} bias") if bias and rec.bn else None)
    for key, value in sentinel_constants.items():
        buffers[key] = find(value, f"sweep state of {key!r}")
    return model_bytes, buffers, rewritten


def moments_model(folded, records) -> keras.Model:
    """The calibration variant: `folded` with one extra output, the per-channel mean and mean of
    squares (over batch and space) of every folded layer's pre-activation output, concatenated as
    [means of BN 1..n, mean squares of BN 1..n].  From these and the folding in force, the on-device
    calibrator recovers the moments of each BN's input at batch size 1 without TensorFlow."""
    ops = keras.ops
    means, squares = [], []
    for rec in records:
        if rec.bn is None:
            continue
        y = folded.get_layer(rec.bn).output  # the FoldedBN identity: the folded layer's output
        axes = tuple(range(len(y.shape) - 1))
        means.append(ops.mean(y, axis=axes))
        squares.append(ops.mean(ops.square(y), axis=axes))
    moments = ops.expand_dims(ops.concatenate(means + squares, axis=0), 0)
    return keras.Model(folded.inputs, list(folded.outputs) + [moments])

def _write_calibration(folded, records, hw, meta, input_as_conv, out_path) -> dict:
    """Convert and write the calibration variant `X.calib.tflite` (`moments_model`); returns its meta entry."""
    calib_bytes, calib_buffers, _ = _convert_folded(moments_model(folded, records), records, hw, meta, input_as_conv)
    path = calibration_path(out_path)
    atomic_write(path, lambda f: f.write(calib_bytes))
    return {"file": path.name, "buffers": calib_buffers, "bns": [rec.bn for rec in records if rec.bn],
            "sha256": sha256(calib_bytes)}


def _write_sweep(folded, records, hw, meta, input_as_conv, out_path) -> dict:
    """Convert and write the sweep variant `X.sweep.tflite` (`edge_cbn.convert.sweep`); returns its meta
    entry: the calibration variant's, plus the buffers of every BN's state rows and how many rows."""
    model, states = sweep_model(folded, records)
    keys = {f"sweep:{bn}:{j}": var for bn, rows in states.items() for j, var in enumerate(rows)}
    sweep_bytes, buffers, _ = _convert_folded(model, records, hw, meta, input_as_conv, constants=keys)
    path = sweep_path(out_path)
    atomic_write(path, lambda f: f.write(sweep_bytes))
    return {"file": path.name, "buffers": {rec.name: buffers[rec.name] for rec in records},
            "bns": [rec.bn for rec in records if rec.bn], "sha256": sha256(sweep_bytes),
            "states": {bn: [buffers[f"sweep:{bn}:{j}"] for j in range(SWEEP_ROWS)] for bn in states},
            "rows": SWEEP_ROWS}


def _outputs(model, x) -> list[np.ndarray]:
    out = model(x, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _fix_outputs(model_bytes: bytearray, probe: np.ndarray, keras_outs: list[np.ndarray]) -> None:
    """Run `probe` through the .tflite, check its outputs against the Keras ones and reorder the
    subgraph's output vector in place so that output i of the .tflite is Keras output i."""
    it = make_interpreter(model_content=bytes(model_bytes))
    tfl = run_interpreter(it, *io_indices(it), probe)
    if len(tfl) != len(keras_outs):
        raise ExportError(f"the .tflite has {len(tfl)} outputs, the Keras model {len(keras_outs)}")
    perm, free = [], set(range(len(tfl)))
    for ref in keras_outs:
        errs = {j: float(np.max(np.abs(tfl[j] - ref))) for j in free if tfl[j].shape == ref.shape}
        if not errs:
            raise ExportError(f"no TFLite output has the Keras output shape {ref.shape}")
        j = min(errs, key=errs.get)
        if not errs[j] <= 1e-3 * max(1.0, float(np.max(np.abs(ref)))):
            raise ExportError(f"exported TFLite disagrees with the folded Keras model (max abs diff {errs[j]:.3g})")
        perm.append(j)
        free.remove(j)
    if perm != sorted(perm):
        sg = tflite.Model.GetRootAs(model_bytes, 0).Subgraphs(0)
        vec = np.frombuffer(model_bytes, "<i4", len(perm), sg._tab.Vector(sg._tab.Offset(8)))  # .outputs
        vec[:] = vec[perm].copy()


def _convert_folded(keras_model, records, hw, meta, input_as_conv=False, constants=None) -> tuple[bytearray, dict, list]:
    """Convert (behind an RGB uint8 input unless the model letterboxes: a letterbox's 127.5 grey is not
    a uint8 value), locate the buffers, write the real folded tensors exactly as on-device refold
    writes them, and check/fix the outputs against Keras; returns the bytes, the buffers and the records
    kept.  A layer without BN whose kernel the converter rewrote is converted again as it is and leaves
    the records (it then holds no noise: a warning names it).  `constants` ({key: Keras variable}) are
    located too, their buffers returned under their keys and their values written into them."""
    pre = meta["preprocess"]
    graph = None if pre.get("letterbox") else with_raw_input(keras_model, pre, input_as_conv)
    sentinel_bytes, buffers, rewritten = _convert_with_sentinels(keras_model, records, hw, graph, constants)
    if rewritten:
        warnings.warn(f"{len(rewritten)} layer(s) without BN had a multiply that follows them fused into their "
                      f"kernel by the converter ({', '.join(rewritten[:3])}{', ...' if len(rewritten) > 3 else ''}): "
                      "exported as they are, without noise on them", stacklevel=2)
        records = [rec for rec in records if rec.name not in rewritten]
        sentinel_bytes, buffers, rewritten = _convert_with_sentinels(keras_model, records, hw, graph, constants)
        if rewritten:
            raise ExportError(f"layer {rewritten[0]!r} kernel: the converter rewrote it; it cannot be refolded")
    located = [dataclasses.replace(rec, w_buffer=buffers[rec.name][0], b_buffer=buffers[rec.name][1])
               for rec in records]
    # A model without conv or dense layers has nothing to write (and a Refolder would refuse it).
    model_bytes = bytearray(Refolder(Bundle(None, sentinel_bytes, meta, located)).model_bytes() if located
                            else sentinel_bytes)
    for key, var in (constants or {}).items():
        start, size = buffer_span(bytes(model_bytes), buffers[key])
        model_bytes[start:start + size] = np.ascontiguousarray(var.numpy(), np.float32).tobytes()
    rgb = np.random.default_rng(1).integers(0, 256, (1, *hw, keras_model.input_shape[-1]), np.uint8)
    x = normalise(rgb, pre)
    _fix_outputs(model_bytes, x if graph is None else rgb, _outputs(keras_model, x))
    return model_bytes, buffers, records


def export(model, out_path, *, name: str, task: str, preprocess: dict, labels, head=None,
           input_size=None, calibration: bool = True, sweep: bool = True, noise_layers=None,
           input_as_conv: bool = False) -> Path:
    """Fold, convert and write `out_path` (.tflite), its sidecar (.cbn.npz) and, with `calibration`, the
    calibration variant `X.calib.tflite` (see `moments_model`) and, with `sweep` too, the sweep variant
    `X.sweep.tflite` (`edge_cbn.convert.sweep`).

    Args:
        model: a functional or Sequential Keras model (nested models and SeparableConv2D are flattened
            first, `keras_graph`); every BatchNormalization folds into the layer before it or becomes an
            affine of its own (`keras_fold`).
        out_path: the .tflite to write (its sidecar and calibration variant go beside it).
        name: the model's name in the sidecar.
        task: "classification", "detection", "segmentation" or "raw".
        preprocess: `{"mean": [3], "std": [3], "letterbox": bool}`, what the graph's input normalisation does.
        labels: the class names.
        head: a detector's head spec (anchors, strides), or None.
        input_size: int or (H, W), needed only if the model's input size is free.
        calibration: also write the calibration variant (when the model has BN layers).
        sweep: with `calibration`, also write the sweep variant (False: the stream calibrates the model depth
            first, one BN layer per calibration frame; the sweep variant is most of the export's conversion time).
        noise_layers: the names of the layers noise acts on, into the sidecar (None: every weight layer).
        input_as_conv: normalise the uint8 input with a 1x1 depthwise convolution (`with_raw_input`), for
            a model whose first layer is a convolution without padding before it.

    Returns:
        The .tflite path.

    Raises:
        FoldError: a BN that cannot be exported (shared, or not on the channel axis), naming it.
        GraphError: a model that cannot be flattened (subclassed, unbuilt, a layer that cannot be copied).
        ValueError: a free input size without `input_size`.
    """
    hw = (input_size, input_size) if isinstance(input_size, int) else input_size or model.input_shape[1:3]
    folded, records = fold_keras(flat_model(model) if needs_flattening(model) else model)
    meta = {"model": name, "task": task, "input_size": [int(hw[0]), int(hw[1])], "preprocess": dict(preprocess),
            "labels": list(labels), "head": head}
    if noise_layers is not None:
        meta["noise_layers"] = list(noise_layers)
    model_bytes, buffers, records = _convert_folded(folded, records, hw, meta, input_as_conv)
    if "noise_layers" in meta:  # less any layer the converter rewrote
        meta["noise_layers"] = [name for name in meta["noise_layers"] if name in buffers]
    try:  # what loading will check, before anything is written: a head or labels that do not fit the outputs
        check_meta({**meta, "format": FORMAT}, model_facts(bytes(model_bytes)), FORMAT)
    except Invalid as e:
        raise ExportError(f"{name}: {e}") from None
    for rec in records:
        rec.w_buffer, rec.b_buffer = buffers[rec.name]

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if calibration and any(rec.bn for rec in records):
        meta["calibration"] = _write_calibration(folded, records, hw, meta, input_as_conv, out_path)
        if sweep:
            meta["sweep"] = _write_sweep(folded, records, hw, meta, input_as_conv, out_path)
    meta["model_sha256"] = sha256(model_bytes)  # checked at load: a flipped bit is refused, not served
    write_sidecar(sidecar_path(out_path), meta, records)
    atomic_write(out_path, lambda f: f.write(model_bytes))
    return out_path
