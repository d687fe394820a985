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
from collections import defaultdict
from pathlib import Path

from .tf_import import keras, tf
import numpy as np
import tflite

from ..runtime import fold
from ..runtime.bundle import (Bundle, LayerRecord, atomic_write, buffer_span, calibration_path, sha256,
                              sidecar_path, write_sidecar)
from ..runtime.interpreter import io_indices, make_interpreter, run_interpreter
from ..runtime.processing import normalise
from ..runtime.native_log import silenced
from ..runtime.refold import Refolder
from .weights.assign import layer_kind

_WEIGHT_KINDS = ("conv", "depthwise", "dense")


class FoldError(ValueError):
    """A BatchNormalization that cannot be folded into the layer before it."""


class FoldedBN(keras.layers.Layer):
    """Identity standing in for a BatchNormalization folded into the layer before it (takes the BN's
    call arguments)."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def _parent(layer):
    nodes = layer._inbound_nodes
    if len(nodes) != 1 or len(nodes[0].parent_nodes) != 1:
        raise FoldError(f"BatchNormalization {layer.name!r} must be called exactly once on one tensor")
    return nodes[0].parent_nodes[0].operation


def fold_plan(model) -> list[tuple]:
    """[(layer, kind, bn layer or None)] for every conv/depthwise/dense layer of `model`, in layer
    order; raises FoldError for a BN that does not directly and solely follow such a layer."""
    bn_of = {}
    output_ops = {t._keras_history.operation.name for t in model.outputs}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise FoldError(f"nested model {layer.name!r}: build the model flat (one functional graph)")
        if layer_kind(layer) != "bn":
            continue
        prev = _parent(layer)
        where = f"BatchNormalization {layer.name!r} after {prev.name!r} ({type(prev).__name__})"
        if layer_kind(prev) not in _WEIGHT_KINDS:
            raise FoldError(f"{where}: only BN directly after Conv2D/DepthwiseConv2D/Dense can be folded")
        if prev.get_config().get("activation", "linear") != "linear":
            raise FoldError(f"{where}: the layer has an activation before the BN")
        if len(prev._outbound_nodes) != 1 or prev.name in output_ops or prev.name in bn_of:
            raise FoldError(f"{where}: the layer's output is also used elsewhere")
        if layer.axis not in (-1, len(layer.input.shape) - 1):
            raise FoldError(f"{where}: BN must normalise the last (channel) axis, not axis {layer.axis}")
        bn_of[prev.name] = layer
    return [(layer, layer_kind(layer), bn_of.get(layer.name)) for layer in model.layers
            if layer_kind(layer) in _WEIGHT_KINDS]


def _record(layer, kind, bn) -> LayerRecord:
    """The sidecar record of one layer (buffer indices filled in later)."""
    weights = layer.get_weights()
    rec = LayerRecord(layer.name, kind, bn and bn.name, bn and float(bn.epsilon), -1, None,
                      kernel=weights[0], bias=weights[1] if len(weights) > 1 else None)
    if bn is not None:
        rec.gamma = None if bn.gamma is None else np.asarray(bn.gamma.numpy(), np.float32)
        rec.beta = None if bn.beta is None else np.asarray(bn.beta.numpy(), np.float32)
        rec.mean = np.asarray(bn.moving_mean.numpy(), np.float32)
        rec.var = np.asarray(bn.moving_variance.numpy(), np.float32)
    return rec


def _folded_weights(rec: LayerRecord, layer) -> list[np.ndarray]:
    if rec.bn is None:
        return layer.get_weights()
    k, b = fold.fold(rec.kind, rec.kernel, rec.bias, rec.gamma, rec.beta, rec.mean, rec.var, rec.eps)
    return [fold.to_keras(rec.kind, k, getattr(layer, "depth_multiplier", 1)), b]


def _fold(model):
    plan = fold_plan(model)
    records = [_record(*p) for p in plan]
    folded_bns = {bn.name for _, _, bn in plan if bn is not None}
    with_bn = {layer.name for layer, _, bn in plan if bn is not None}

    def clone(layer):
        if layer.name in folded_bns:
            return FoldedBN(name=layer.name)
        cfg = layer.get_config()
        if layer.name in with_bn:
            cfg["use_bias"] = True
        return layer.__class__.from_config(cfg)

    folded = keras.models.clone_model(model, clone_function=clone)
    originals = {layer.name: layer for layer in model.layers}
    by_name = {rec.name: rec for rec in records}
    for layer in folded.layers:
        if layer.weights:
            src = originals[layer.name]
            layer.set_weights(_folded_weights(by_name[layer.name], src) if layer.name in by_name
                              else src.get_weights())
    return folded, records


def fold_model(model) -> keras.Model:
    """A copy of `model` with every BN folded into the conv/depthwise/dense layer before it (which
    gains a bias) and replaced by an identity layer of the same name."""
    return _fold(model)[0]


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
            return converter.convert()
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def with_raw_input(model, preprocess: dict) -> keras.Model:
    """`model` behind an RGB uint8 input normalised in the graph, (x - mean) / std as
    `runtime.normalise` does: the device then feeds resized camera pixels as they are (a quarter of
    the bytes of float input, no normalisation pass in Python)."""
    inp = keras.Input(model.input_shape[1:], dtype="uint8", name="rgb")
    x = keras.ops.cast(inp, "float32")
    x = (x - np.float32(preprocess["mean"])) / np.float32(preprocess["std"])
    return keras.Model(inp, model(x))


def _convert_with_sentinels(folded, records, input_hw, graph=None) -> tuple[bytes, dict]:
    """Convert `graph` (default `folded`, whose layers it uses) with unique random weights in every
    recorded layer of `folded`, locate each layer's kernel and bias buffers by exact byte match and
    restore the real weights; returns the sentinel model and {layer name: (w_buffer, b_buffer)}."""
    rng = np.random.default_rng(0)
    real, sentinels = {}, {}
    for rec in records:
        layer = folded.get_layer(rec.name)
        real[rec.name] = layer.get_weights()
        sentinels[rec.name] = [rng.standard_normal(w.shape).astype(np.float32) for w in real[rec.name]]
        layer.set_weights(sentinels[rec.name])
    try:
        model_bytes = convert_keras(folded if graph is None else graph, input_hw)
    finally:
        for name, weights in real.items():
            folded.get_layer(name).set_weights(weights)

    model = tflite.Model.GetRootAs(model_bytes, 0)
    data = memoryview(model_bytes)
    by_size = defaultdict(list)
    for i in range(model.BuffersLength()):
        start, size = buffer_span(model_bytes, i, model)
        if size:
            by_size[size].append((i, start))

    def find(arr, what):
        needle = np.ascontiguousarray(arr, np.float32).tobytes()
        hits = [i for i, start in by_size[len(needle)] if data[start:start + len(needle)] == needle]
        if len(hits) != 1:
            raise RuntimeError(f"{what}: found in {len(hits)} TFLite buffers, expected exactly one (the "
                               "converter rewrote or fused this tensor; it cannot be refolded)")
        return hits[0]

    buffers = {}
    for rec in records:
        kernel, *bias = sentinels[rec.name]
        buffers[rec.name] = (find(fold.to_tflite(rec.kind, kernel), f"layer {rec.name!r} kernel"),
                             find(bias[0], f"layer {rec.name!r} bias") if bias else None)
    return model_bytes, buffers


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

def _outputs(model, x) -> list[np.ndarray]:
    out = model(x, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _fix_outputs(model_bytes: bytearray, probe: np.ndarray, keras_outs: list[np.ndarray]) -> None:
    """Run `probe` through the .tflite, check its outputs against the Keras ones and reorder the
    subgraph's output vector in place so that output i of the .tflite is Keras output i."""
    it = make_interpreter(model_content=bytes(model_bytes))
    tfl = run_interpreter(it, *io_indices(it), probe)
    if len(tfl) != len(keras_outs):
        raise RuntimeError(f"the .tflite has {len(tfl)} outputs, the Keras model {len(keras_outs)}")
    perm, free = [], set(range(len(tfl)))
    for ref in keras_outs:
        errs = {j: float(np.max(np.abs(tfl[j] - ref))) for j in free if tfl[j].shape == ref.shape}
        if not errs:
            raise RuntimeError(f"no TFLite output has the Keras output shape {ref.shape}")
        j = min(errs, key=errs.get)
        if not errs[j] <= 1e-3 * max(1.0, float(np.max(np.abs(ref)))):
            raise RuntimeError(f"exported TFLite disagrees with the folded Keras model (max abs diff {errs[j]:.3g})")
        perm.append(j)
        free.remove(j)
    if perm != sorted(perm):
        sg = tflite.Model.GetRootAs(model_bytes, 0).Subgraphs(0)
        vec = np.frombuffer(model_bytes, "<i4", len(perm), sg._tab.Vector(sg._tab.Offset(8)))  # .outputs
        vec[:] = vec[perm].copy()


def _convert_folded(keras_model, records, hw, meta) -> tuple[bytearray, dict]:
    """Convert (behind an RGB uint8 input unless the model letterboxes: a letterbox's 127.5 grey is not
    a uint8 value), locate the buffers, write the real folded tensors exactly as on-device refold
    writes them, and check/fix the outputs against Keras."""
    pre = meta["preprocess"]
    graph = None if pre.get("letterbox") else with_raw_input(keras_model, pre)
    sentinel_bytes, buffers = _convert_with_sentinels(keras_model, records, hw, graph)
    located = [dataclasses.replace(rec, w_buffer=buffers[rec.name][0], b_buffer=buffers[rec.name][1])
               for rec in records]
    refolder = Refolder(Bundle(None, sentinel_bytes, meta, located))
    refolder.reset()
    model_bytes = bytearray(refolder.model_bytes())
    rgb = np.random.default_rng(1).integers(0, 256, (1, *hw, keras_model.input_shape[-1]), np.uint8)
    x = normalise(rgb, pre)
    _fix_outputs(model_bytes, x if graph is None else rgb, _outputs(keras_model, x))
    return model_bytes, buffers


def export(model, out_path, *, name: str, task: str, preprocess: dict, labels, head=None,
           input_size=None, calibration: bool = True) -> Path:
    """Fold, convert and write `out_path` (.tflite), its sidecar (.cbn.npz) and, with `calibration`, the
    calibration variant `X.calib.tflite` (see `moments_model`).

    Args:
        model: a functional Keras model whose every BatchNormalization directly follows a Conv2D,
            DepthwiseConv2D or Dense layer.
        out_path: the .tflite to write (its sidecar and calibration variant go beside it).
        name: the model's name in the sidecar.
        task: "classification", "detection" or "segmentation".
        preprocess: `{"mean": [3], "std": [3], "letterbox": bool}`, what the graph's input normalisation does.
        labels: the class names.
        head: a detector's head spec (anchors, strides), or None.
        input_size: int or (H, W), needed only if the model's input size is free.
        calibration: also write the calibration variant (when the model has BN layers).

    Returns:
        The .tflite path.

    Raises:
        FoldError: a BN that cannot be folded (not directly after a conv or dense layer, shared, nested).
        ValueError: a free input size without `input_size`.
    """
    hw = (input_size, input_size) if isinstance(input_size, int) else input_size or model.input_shape[1:3]
    folded, records = _fold(model)
    meta = {"model": name, "task": task, "input_size": [int(hw[0]), int(hw[1])], "preprocess": dict(preprocess),
            "labels": list(labels), "head": head}
    model_bytes, buffers = _convert_folded(folded, records, hw, meta)
    for rec in records:
        rec.w_buffer, rec.b_buffer = buffers[rec.name]

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if calibration and any(rec.bn for rec in records):
        calib_bytes, calib_buffers = _convert_folded(moments_model(folded, records), records, hw, meta)
        calib_path = calibration_path(out_path)
        meta["calibration"] = {"file": calib_path.name, "buffers": calib_buffers,
                               "bns": [rec.bn for rec in records if rec.bn], "sha256": sha256(calib_bytes)}
        atomic_write(calib_path, lambda f: f.write(calib_bytes))
    meta["model_sha256"] = sha256(model_bytes)  # checked at load: a flipped bit is refused, not served
    write_sidecar(sidecar_path(out_path), meta, records)
    atomic_write(out_path, lambda f: f.write(model_bytes))
    return out_path
