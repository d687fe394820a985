"""BatchNorm folding: the one place the arithmetic lives (device side, numpy only).

Export (`edge_cbn.convert.export`) and the on-device refold (`edge_cbn.runtime.refold`) both call these functions, so an
exported `.tflite` and a refolded one hold bit-identical tensors for the same statistics.

Arithmetic: the per-channel scale `s = gamma / sqrt(var + eps)` and the folded bias
`beta + (bias - mean) * s` are computed in float64 and rounded to float32 once; the folded kernel is the
float32 product `kernel * s` (one IEEE rounding per element, no float64 copy of the kernel, so refold can
write it straight into the flatbuffer with `out=`).

Layouts: Keras conv HWIO, depthwise HWCM (M = depth multiplier, 1 in the zoo), dense IO, transposed
conv HWOI; TFLite conv OHWI, depthwise 1HW(C*M), dense OI, transposed conv OHWI.  The output channel is
axis 0 of a TFLite conv/dense/transposed-conv kernel and the last axis of a depthwise one.

Kind "affine" is a BatchNorm that follows no layer it could fold into (after an Add, a Concatenate, an
activation, pooling, or at the input): the export gives it a per-channel scale and shift of its own, as a
1x1 depthwise convolution of an all-ones kernel (`edge_cbn.convert.keras_fold.ChannelAffine`), so it
folds, refolds and calibrates exactly as a depthwise layer does; it is never a noise target.
"""
from __future__ import annotations

import numpy as np

KINDS = ("conv", "depthwise", "dense", "transpose", "affine")
_DEPTHWISE_LAYOUT = ("depthwise", "affine")
# The kinds that hold a weight of the network (an analog chip's conductances): what noise can target.
WEIGHT_KINDS = ("conv", "depthwise", "dense", "transpose")


def to_tflite(kind: str, kernel: np.ndarray) -> np.ndarray:
    """Keras layout -> TFLite layout (a view where numpy allows it; not necessarily contiguous)."""
    if kind == "conv":
        return kernel.transpose(3, 0, 1, 2)
    if kind == "transpose":
        return kernel.transpose(2, 0, 1, 3)
    if kind in _DEPTHWISE_LAYOUT:
        h, w, c, m = kernel.shape
        return kernel.reshape(1, h, w, c * m)
    if kind == "dense":
        return kernel.T
    raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")


def to_keras(kind: str, kernel: np.ndarray, multiplier: int = 1) -> np.ndarray:
    """TFLite layout -> Keras layout (`multiplier`: the depthwise depth multiplier)."""
    if kind == "conv":
        return kernel.transpose(1, 2, 3, 0)
    if kind == "transpose":
        return kernel.transpose(1, 2, 0, 3)
    if kind in _DEPTHWISE_LAYOUT:
        _, h, w, cm = kernel.shape
        return kernel.reshape(h, w, cm // multiplier, multiplier)
    if kind == "dense":
        return kernel.T
    raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")


def out_channels(kind: str, tflite_shape: tuple) -> int:
    return tflite_shape[-1] if kind in _DEPTHWISE_LAYOUT else tflite_shape[0]


def channel_shape(kind: str, channels: int) -> tuple:
    """Shape that broadcasts a per-output-channel vector against a TFLite-layout kernel."""
    return {"conv": (channels, 1, 1, 1), "transpose": (channels, 1, 1, 1), "depthwise": (1, 1, 1, channels),
            "affine": (1, 1, 1, channels), "dense": (channels, 1)}[kind]


def bn_scale(gamma, var, eps: float) -> np.ndarray:
    """Per-output-channel BN scale `gamma / sqrt(var + eps)` (float64 math, float32 result)."""
    g = np.ones_like(var, np.float64) if gamma is None else np.asarray(gamma, np.float64)
    return (g / np.sqrt(np.asarray(var, np.float64) + eps)).astype(np.float32)


def fold_bias(s, beta, mean, bias=None, out=None) -> np.ndarray:
    """Folded bias `beta + (bias - mean) * s` (float64 math, rounded to float32 once)."""
    folded = -np.asarray(mean, np.float64)
    if bias is not None:
        folded += bias
    folded *= s
    if beta is not None:
        folded += beta
    if out is None:
        return folded.astype(np.float32)
    out[...] = folded
    return out


def fold_kernel(kind: str, kernel_tflite: np.ndarray, s: np.ndarray, out=None) -> np.ndarray:
    """Folded kernel in TFLite layout: `kernel * s` along the output channel, float32."""
    s = np.asarray(s, np.float32).reshape(channel_shape(kind, len(s)))
    return np.multiply(kernel_tflite, s, out=out, dtype=np.float32)


def fold(kind, kernel, bias, gamma, beta, mean, var, eps):
    """Unfolded Keras-layout kernel (+ optional bias) and BN parameters -> (kernel in TFLite layout,
    bias), both float32.  `gamma`/`beta` may be None (BN with scale/center off)."""
    s = bn_scale(gamma, var, eps)
    k = to_tflite(kind, np.asarray(kernel, np.float32))
    return fold_kernel(kind, k, s), fold_bias(s, beta, mean, bias)
