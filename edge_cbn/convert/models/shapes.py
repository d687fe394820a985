"""Two small models trained here, on synthetic shape scenes (`tools/train_synthetic.py`), whose weights ship
in the package (`weights/<name>.npz`): no COCO, VOC or published checkpoint can be downloaded, and the
paper's detection and segmentation claims still need a model to measure them on.

- `yolo_shapes`: a YOLOv3-style detector.  Darknet-style backbone (strided 3x3 convs, 1x1-reduce/3x3-expand
  residual blocks, leaky ReLU), a top-down neck, and two raw head maps at strides 16 and 8 decoded by the
  device exactly as YOLOv3's (`runtime/detection.py`, with `HEAD` in the sidecar).
- `fcn_shapes`: an FCN-style segmenter on the same backbone: a top-down decoder to stride 4 whose last 3x3
  conv-BN-ReLU and a 1x1 classifier make torchvision's FCNHead, and a bilinear resize of the logits to the
  input size.

In the style of `keras/applications`: a block (`residual_block`), a stage (`stage`), a backbone and two
builders.  Every conv is `X.conv` followed by its BatchNormalization `X.bn` (what folding and calibration
need), except the prediction convs (`head16`, `head8`, `classifier`: linear, with a bias, as YOLOv3's and
FCN's are).  The layer names are the keys of the shipped `.npz` (torch layout: `stem.conv.weight`,
`stem.bn.running_mean`, ...; `edge_cbn.convert.weights.npz`).
"""
from __future__ import annotations

from ..tf_import import keras
from keras import layers

from . import register
from .mobilenet_v2 import conv_bn
from .shape_classes import SEGMENTATION_CLASSES, SHAPE_CLASSES

BN_EPS = 1e-3
INPUT_SIZE = 160
# (x - 127.5) / 127.5: inputs in [-1, 1].
PREPROCESS = {"mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5], "letterbox": False}
# Anchors (input pixels) log-spaced over the scenes' box sizes (about 12 to 100 px at 160), three per map;
# maps in decreasing stride, the order the device decodes them in.
HEAD = {
    "anchors": [[14, 14], [20, 20], [29, 29], [43, 43], [62, 62], [90, 90]],
    "masks": [[3, 4, 5], [0, 1, 2]],
    "strides": [16, 8],
}
STEM_WIDTH = 16
STAGES = ((32, 1), (64, 2), (128, 2), (192, 1))  # (width, residual blocks): strides 4, 8, 16, 32


def conv_unit(x, filters, kernel, name, *, stride=1):
    """Conv `{name}.conv` -> BN `{name}.bn` -> leaky ReLU (darknet's 0.1)."""
    return conv_bn(x, filters, kernel, stride, f"{name}.conv", f"{name}.bn", act="leaky", eps=BN_EPS)


def residual_block(x, name):
    """Darknet residual: 1x1 conv to half the width, 3x3 conv back, + input."""
    filters = x.shape[-1]
    y = conv_unit(x, filters // 2, 1, f"{name}.reduce")
    y = conv_unit(y, filters, 3, f"{name}.expand")
    return layers.Add(name=f"{name}.add")([x, y])


def stage(x, filters, blocks, name):
    """A strided 3x3 conv (halves the resolution) then `blocks` residual blocks."""
    x = conv_unit(x, filters, 3, f"{name}.down", stride=2)
    for j in range(blocks):
        x = residual_block(x, f"{name}.block{j}")
    return x


def backbone(inputs) -> list:
    """The stem and the four stages; returns their outputs, at strides 4, 8, 16 and 32."""
    x = conv_unit(inputs, STEM_WIDTH, 3, "stem", stride=2)
    features = []
    for k, (filters, blocks) in enumerate(STAGES):
        x = stage(x, filters, blocks, f"stage{k + 1}")
        features.append(x)
    return features


def merge_up(x, skip, filters, name):
    """One top-down step: 1x1 conv, 2x nearest upsampling, concatenation with the finer `skip`, 3x3 conv."""
    x = conv_unit(x, filters // 2, 1, f"{name}.lateral")
    x = layers.UpSampling2D(2, interpolation="nearest", name=f"{name}.up")(x)
    x = layers.Concatenate(name=f"{name}.concat")([x, skip])
    return conv_unit(x, filters, 3, f"{name}.fuse")


@register("yolo_shapes", input_size=INPUT_SIZE, task="detection", weights_format="npz", preprocess=PREPROCESS,
          labels=SHAPE_CLASSES, num_classes=len(SHAPE_CLASSES), weights_file="yolo_shapes.npz", head=HEAD)
def yolo_shapes(num_classes=len(SHAPE_CLASSES), input_shape=(INPUT_SIZE, INPUT_SIZE, 3)):
    inputs = keras.Input(input_shape, name="input")
    _, s8, s16, s32 = backbone(inputs)
    p16 = merge_up(s32, s16, 128, "neck16")
    p8 = merge_up(p16, s8, 64, "neck8")
    channels = 3 * (5 + num_classes)  # per anchor: tx, ty, tw, th, objectness, class logits
    heads = [layers.Conv2D(channels, 1, name=name)(p) for name, p in (("head16", p16), ("head8", p8))]
    return keras.Model(inputs, heads, name="yolo_shapes")


@register("fcn_shapes", input_size=INPUT_SIZE, task="segmentation", weights_format="npz", preprocess=PREPROCESS,
          labels=SEGMENTATION_CLASSES, num_classes=len(SEGMENTATION_CLASSES), weights_file="fcn_shapes.npz")
def fcn_shapes(num_classes=len(SEGMENTATION_CLASSES), input_shape=(INPUT_SIZE, INPUT_SIZE, 3)):
    inputs = keras.Input(input_shape, name="input")
    s4, s8, s16, s32 = backbone(inputs)
    x = merge_up(s32, s16, 96, "decoder16")
    x = merge_up(x, s8, 64, "decoder8")
    x = merge_up(x, s4, 32, "decoder4")  # its 3x3 conv-BN-ReLU is the FCN head's
    x = layers.Conv2D(num_classes, 1, name="classifier")(x)
    # Half-pixel-centre bilinear to the input size, as torchvision's FCN.
    outputs = layers.Resizing(input_shape[0], input_shape[1], interpolation="bilinear", name="upsample")(x)
    return keras.Model(inputs, outputs, name="fcn_shapes")
