"""The sweep variant `X.sweep.tflite`: one invoke calibrates every BN layer of a frame, depth first.

The calibration variant measures each BN layer's input under the statistics folded into it, so a depth-first
warm-up needs one refold and one invoke per BN layer.  The sweep variant does that pass inside the graph:
after every folded layer, `SweepBN` takes the moments of this frame's output y, forms the estimate the
streaming calibrator (`runtime.stream_calibrator`, `shift` mode) would hand out once this frame is added to
its accumulators, and applies it to y, so the layers below are measured under it.  Its extra last output
is the moments of every folded layer's y before that correction, as in the calibration variant (the
source statistics folded in): the calibrator adds them to its accumulators and gets the same estimate.

What the graph cannot know (the accumulators so far, the clean model's moments of the frame) comes in as
SWEEP_ROWS constants per BN layer, one value per channel each, that the device writes into the flatbuffer
before it builds the interpreter (`runtime.sweep` gives the formulas).  Each is used only together with
a tensor computed from the input, so the converter keeps it as a buffer of its own.  The rows the export
writes make the correction the identity: the variant then computes what the calibration variant does.
"""
from __future__ import annotations

import numpy as np

from ..runtime.sweep import ROW_NAMES, identity_rows, source_fold
from .tf_import import keras


class SweepBN(keras.layers.Layer):
    """A folded BN's correction from this frame's moments m, q (mean and mean of squares of y):
    y' = A * y + B (`runtime.sweep`).

    Args:
        rec: the folded layer's `LayerRecord` (its BN's gamma, beta, eps and source statistics).
    """

    def __init__(self, rec, **kwargs):
        super().__init__(**kwargs)
        s0, c0, _ = source_fold(rec)
        var = np.asarray(rec.var, np.float64)
        beta = np.zeros_like(var) if rec.beta is None else np.asarray(rec.beta, np.float64)
        constants = {"s0": s0, "c0": c0, "beta": beta, "k1": var / (var + rec.eps), "k2": rec.eps / (var + rec.eps)}
        self.constants = {k: v.astype(np.float32) for k, v in constants.items()}
        self.rows = [self.add_weight(shape=row.shape, trainable=False, name=name,
                                     initializer=keras.initializers.Constant(row))
                     for name, row in zip(ROW_NAMES, identity_rows(rec.mean, rec.var))]

    def call(self, y, m, q):
        ops, k = keras.ops, self.constants
        gain, offset, gain2, spread, centre, spread_offset, inv_clean_var, clean_flat, shift = self.rows
        mean_n = gain * m + offset
        var_n = gain2 * (q - ops.square(m)) + spread * ops.square(m - centre) + spread_offset
        a2 = ops.relu(var_n) * inv_clean_var + clean_flat
        mean = mean_n + ops.sqrt(a2) * shift
        gain_y = ops.rsqrt(a2 * k["k1"] + k["k2"])
        return gain_y * y + (k["beta"] - gain_y * (k["s0"] * mean + k["c0"]))


def sweep_model(folded, records):
    """`folded` with a `SweepBN` after every folded layer and one extra output: the moments of each folded
    layer's y before its correction, laid out as the calibration variant's (`export.moments_model`).

    Args:
        folded: the folded Keras model (`keras_fold.fold_keras`).
        records: its `LayerRecord`s.

    Returns:
        (model, {bn name: the `SweepBN`'s row variables, in `ROW_NAMES` order}).
    """
    ops = keras.ops
    by_bn = {rec.bn: rec for rec in records if rec.bn}
    moments, states = {}, {}

    def call(layer, *args, **kwargs):
        y = layer(*args, **kwargs)  # a FoldedBN passes y through; a BN kept as an affine computes it
        if layer.name not in by_bn:
            return y
        axes = tuple(range(len(y.shape) - 1))
        m, q = ops.mean(y, axis=axes), ops.mean(ops.square(y), axis=axes)
        sweep = SweepBN(by_bn[layer.name], name=f"{layer.name}_sweep")
        moments[layer.name], states[layer.name] = (m, q), sweep.rows
        return sweep(y, m, q)

    clone = keras.models.clone_model(folded, clone_function=lambda layer: layer, call_function=call)
    bns = [rec.bn for rec in records if rec.bn]
    vector = ops.concatenate([moments[bn][0] for bn in bns] + [moments[bn][1] for bn in bns], axis=0)
    return keras.Model(clone.inputs, list(clone.outputs) + [ops.expand_dims(vector, 0)]), states
