"""Fold every BatchNorm of a flat Keras graph (`keras_graph.flat_model`) for export.

A BN directly and solely after a Conv2D, DepthwiseConv2D, Conv2DTranspose or Dense layer without an
activation folds into that layer's kernel and bias, and is replaced by an identity of its name
(`FoldedBN`).  Any other BN (after an Add or Concatenate, an activation, pooling, at the input, or after a
layer whose output is also used elsewhere) becomes a `ChannelAffine` of its name: a per-channel scale
and shift, exported as a 1x1 depthwise convolution of an all-ones kernel with the BN folded into it.  Both
kinds then have a kernel and a bias buffer that export, refold and calibration treat alike (the sidecar
record's kind "affine", `edge_cbn.runtime.fold`).
"""
from __future__ import annotations

import numpy as np

from ..runtime import fold
from ..runtime.bundle import LayerRecord
from .tf_import import keras
from .weights.assign import layer_kind


class FoldError(ValueError):
    """A BatchNormalization that cannot be exported; the message names it."""


class FoldedBN(keras.layers.Layer):
    """Identity standing in for a BatchNormalization folded into the layer before it (takes the BN's
    call arguments)."""

    def call(self, inputs, training=None, mask=None):
        return inputs


class ChannelAffine(keras.layers.Layer):
    """`x * kernel + bias` per channel (the last axis) computed as a 1x1 depthwise convolution, which
    TFLite keeps as one op with its own kernel and bias buffers (a Mul and an Add of constants it would
    fuse into a neighbouring layer).  Inputs of rank 2 or 3 run with size-1 axes added, squeezed after: a
    reshape back instead lets the converter move the shift into a Dense that follows."""

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight(shape=(1, 1, channels, 1), initializer="ones", name="kernel")
        self.bias = self.add_weight(shape=(channels,), initializer="zeros", name="bias")

    def call(self, inputs, training=None, mask=None):
        ops, axes = keras.ops, {2: (1, 2), 3: (2,), 4: ()}[len(inputs.shape)]
        x = ops.expand_dims(inputs, axes) if axes else inputs
        y = ops.depthwise_conv(x, self.kernel, strides=1, padding="valid") + self.bias
        return ops.squeeze(y, axes) if axes else y


def _parent(layer):
    nodes = layer._inbound_nodes
    if len(nodes) != 1 or len(nodes[0].parent_nodes) != 1:
        raise FoldError(f"BatchNormalization {layer.name!r} must be called exactly once on one tensor")
    return nodes[0].parent_nodes[0].operation


def _folds_into(bn, prev, output_ops, taken) -> bool:
    """Whether `bn` folds into `prev`, the layer whose output it normalises."""
    return (layer_kind(prev) in fold.WEIGHT_KINDS and prev.get_config().get("activation", "linear") == "linear"
            and len(prev._outbound_nodes) == 1 and prev.name not in output_ops and prev.name not in taken)


def fold_plan(model) -> list[tuple]:
    """[(layer, kind, bn layer or None)] in layer order: every conv/depthwise/dense/transposed-conv layer
    with the BN that folds into it, and (bn, "affine", bn) for every BN that folds into nothing.

    Raises:
        FoldError: a nested model (flatten it first), a BN called more than once, or one that does not
            normalise the last (channel) axis.
    """
    bn_of, affine = {}, set()
    output_ops = {t._keras_history.operation.name for t in model.outputs}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise FoldError(f"nested model {layer.name!r}: flatten the model first (keras_graph.flat_model)")
        if layer_kind(layer) != "bn":
            continue
        prev = _parent(layer)
        if layer.axis not in (-1, len(layer.input.shape) - 1):
            raise FoldError(f"BatchNormalization {layer.name!r} normalises axis {layer.axis}: only the last "
                            "(channel) axis is supported (channels-last models)")
        if len(layer.input.shape) not in (2, 3, 4) or None in layer.input.shape[1:]:
            raise FoldError(f"BatchNormalization {layer.name!r} on input shape {tuple(layer.input.shape)}: "
                            "only rank 2-4 inputs of fixed size are supported")
        if _folds_into(layer, prev, output_ops, bn_of):
            bn_of[prev.name] = layer
        else:
            affine.add(layer.name)
    plan = []
    for layer in model.layers:
        if layer.name in affine:
            plan.append((layer, "affine", layer))
        elif layer_kind(layer) in fold.WEIGHT_KINDS:
            plan.append((layer, layer_kind(layer), bn_of.get(layer.name)))
    return plan


def _record(layer, kind, bn) -> LayerRecord:
    """The sidecar record of one layer (buffer indices filled in later)."""
    if kind == "affine":  # its own 1x1 depthwise kernel of ones, no bias of its own
        weights = [np.ones((1, 1, bn.moving_mean.shape[0], 1), np.float32)]
    else:
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


def fold_keras(model) -> tuple:
    """(folded copy of `model`, [LayerRecord] in layer order): every BN folded into the layer before it
    (which gains a bias) and replaced by a `FoldedBN`, or made a `ChannelAffine`, of the same name.

    Raises:
        FoldError: as `fold_plan`.
    """
    plan = fold_plan(model)
    records = [_record(*p) for p in plan]
    affine = {bn.name for _, kind, bn in plan if kind == "affine"}
    folded_bns = {bn.name for _, kind, bn in plan if bn is not None and kind != "affine"}
    with_bn = {layer.name for layer, kind, bn in plan if bn is not None and kind != "affine"}

    def clone(layer):
        if layer.name in affine:
            return ChannelAffine(name=layer.name)
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


def fold_model(model) -> "keras.Model":
    """A copy of `model` with every BN folded (`fold_keras`), without the records."""
    return fold_keras(model)[0]
