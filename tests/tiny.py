"""A tiny Keras model with every layer pattern the exporter and calibrator must handle (shared by tests)."""
import keras
import numpy as np
from keras import layers

from edge_cbn.convert.weights.assign import assign_state_dict, random_state_dict

SIZE = 16
PRE = {"mean": [120.0, 110.0, 100.0], "std": [60.0, 58.0, 57.0], "letterbox": False}


def conv_bn(x, filters, kernel, stride, name, *, depthwise=False, act="relu", bias=False, mult=1):
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", depth_multiplier=mult, use_bias=bias,
                                   name=f"{name}.conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=bias, name=f"{name}.conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}.bn")(x)
    return layers.ReLU(6.0 if act == "relu6" else None)(x) if act else x


def tiny_model(num_classes=10, seg=False, seed=0):
    """Conv+BN+ReLU (torch-style explicit padding), depthwise+BN+ReLU6 (and a depth multiplier),
    residual add, conv with bias + BN, plain conv, dense head; `seg` adds a second (map) output."""
    inp = keras.Input((SIZE, SIZE, 3), name="input")
    x = layers.ZeroPadding2D(1, name="stem.pad")(inp)
    x = layers.Conv2D(8, 3, 2, use_bias=False, name="stem.conv")(x)
    x = layers.ReLU()(layers.BatchNormalization(epsilon=1e-5, name="stem.bn")(x))
    y = conv_bn(x, None, 3, 1, "b0.dw", depthwise=True, act="relu6")
    y = conv_bn(y, 8, 1, 1, "b0.pw", act=None)
    x = layers.Add(name="b0.add")([x, y])
    x = conv_bn(x, None, 3, 1, "b1.dw", depthwise=True, mult=2, bias=True)
    x = conv_bn(x, 12, 1, 1, "b1.pw", bias=True)
    outputs = []
    if seg:
        outputs.append(layers.Conv2D(5, 1, name="seg")(x))
    x = layers.GlobalAveragePooling2D()(x)
    outputs.insert(0, layers.Dense(num_classes, name="fc")(x))
    model = keras.Model(inp, outputs if seg else outputs[0])
    assign_state_dict(model, random_state_dict(model, seed))
    return model


def new_stats(bundle, seed):
    """Random BN statistics near the bundle's own, for refold tests."""
    rng = np.random.default_rng(seed)
    return {r.bn: (r.mean + rng.normal(0, 0.2, r.mean.shape).astype(np.float32),
                   r.var * rng.uniform(0.5, 2.0, r.var.shape).astype(np.float32))
            for r in bundle.layers if r.bn}


def pixels(x, pre=PRE):
    """Normalised float input -> the nearest RGB uint8 pixels (what an exported model takes)."""
    return np.clip(np.rint(np.asarray(x) * np.float32(pre["std"]) + np.float32(pre["mean"])), 0, 255).astype(np.uint8)
