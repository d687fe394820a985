"""MobileNetV2 exactly as torchvision builds it (`torchvision.models.mobilenet_v2`), layer names = its
state-dict prefixes (`features.3.conv.1.0` is block 3's depthwise conv).

torchvision pads symmetrically (`padding=(k-1)//2`); for stride 1 that is Keras "same", for stride 2 it is
an explicit `ZeroPadding2D` + "valid" (Keras "same" would pad bottom/right only)."""
from __future__ import annotations

from ..tf_import import keras
from keras import layers

from . import IMAGENET_TORCH, register

BN_EPS = 1e-5
# (expand ratio t, output channels c, repeats n, first stride s), as in torchvision.
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def conv_bn(x, filters, kernel, stride, conv_name, bn_name=None, *, depthwise=False, act=None, eps=BN_EPS,
            padding="symmetric"):
    """Conv (or depthwise conv) -> BN -> activation; shared by the model families in this package.

    padding "symmetric" is torch/darknet `(k-1)//2` on every side, "same" is TF "same".  Without `bn_name`
    the conv carries a bias and no BN follows.  act: None | "relu6" | "leaky" (slope 0.1, darknet)."""
    if padding == "symmetric" and stride > 1:
        x = layers.ZeroPadding2D((kernel - 1) // 2, name=f"{conv_name}.pad")(x)
        padding = "valid"
    elif padding == "symmetric":
        padding = "same"  # stride 1, odd kernel: identical to symmetric padding
    common = dict(strides=stride, padding=padding, use_bias=bn_name is None, name=conv_name)
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, **common)(x)
    else:
        x = layers.Conv2D(filters, kernel, **common)(x)
    if bn_name is not None:
        x = layers.BatchNormalization(epsilon=eps, name=bn_name)(x)
    out_name = bn_name or conv_name
    if act == "relu6":
        x = layers.ReLU(6.0, name=f"{out_name}.relu6")(x)
    elif act == "leaky":
        x = layers.LeakyReLU(negative_slope=0.1, name=f"{out_name}.leaky")(x)
    elif act is not None:
        raise ValueError(f"unknown activation {act!r}")
    return x


def conv_norm_act(x, filters, kernel, stride, name, depthwise=False):
    """torchvision `Conv2dNormActivation`: conv `{name}.0`, BN `{name}.1`, ReLU6."""
    return conv_bn(x, filters, kernel, stride, f"{name}.0", f"{name}.1", depthwise=depthwise, act="relu6")


def inverted_residual(x, filters, stride, expand_ratio, name):
    """torchvision `InvertedResidual`: [1x1 expand] -> 3x3 depthwise -> 1x1 linear project (+ identity)."""
    in_ch = x.shape[-1]
    y, k = x, 0
    if expand_ratio != 1:
        y = conv_norm_act(y, in_ch * expand_ratio, 1, 1, f"{name}.conv.0")
        k = 1
    y = conv_norm_act(y, None, 3, stride, f"{name}.conv.{k}", depthwise=True)
    y = conv_bn(y, filters, 1, 1, f"{name}.conv.{k + 1}", f"{name}.conv.{k + 2}")
    if stride == 1 and in_ch == filters:
        y = layers.Add(name=f"{name}.add")([x, y])
    return y


@register("mobilenet_v2", input_size=224, task="classification", weights_format="torchvision",
          preprocess=IMAGENET_TORCH, labels="imagenet", num_classes=1000, weights_file="mobilenet_v2-b0353104.pth")
def mobilenet_v2(num_classes=1000, input_shape=(224, 224, 3)):
    inputs = keras.Input(input_shape, name="input")
    x = conv_norm_act(inputs, 32, 3, 2, "features.0")
    idx = 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            x = inverted_residual(x, c, s if i == 0 else 1, t, f"features.{idx}")
            idx += 1
    x = conv_norm_act(x, 1280, 1, 1, f"features.{idx}")
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    x = layers.Dense(num_classes, name="classifier.1")(x)  # classifier.0 is Dropout (identity at inference)
    return keras.Model(inputs, x, name="mobilenet_v2")
