"""YOLOv3 (Darknet-53 backbone + three-scale head) exactly as darknet's `cfg/yolov3.cfg`.

The network is first written out as the cfg's layer list (`cfg_layers`), then built layer by layer, so
`conv_{i}` / `bn_{i}` carry the 0-based cfg index `i` that orders the tensors in a `.weights` file.  Darknet
pads a conv by `size//2` on every side: "same" for stride 1, explicit `ZeroPadding2D` + "valid" for
stride 2.  The model outputs the raw maps feeding the three `[yolo]` layers (strides 32, 16, 8); decoding
is device side (`edge_cbn.detection.decode_yolo`) with `HEAD`."""
from __future__ import annotations

from ..tf_import import keras
from keras import layers

from . import DARKNET, register
from .mobilenet_v2 import conv_bn

BN_EPS = 1e-5  # darknet's batchnorm: (x - mean) / sqrt(var + .00001)
HEAD = {
    "anchors": [[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119], [116, 90], [156, 198], [373, 326]],
    "masks": [[6, 7, 8], [3, 4, 5], [0, 1, 2]],
    "strides": [32, 16, 8],
}
# Darknet-53 stages after the 32-filter stem: (filters of the stride-2 conv, residual blocks).
DARKNET53_STAGES = [(64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)]


def _conv(filters, size, stride=1, bn=True):
    return {"type": "convolutional", "filters": filters, "size": size, "stride": stride, "bn": bn}


def cfg_layers(num_classes: int = 80) -> list[dict]:
    """The layers of yolov3.cfg in order (107 of them: conv, shortcut, route, upsample, yolo)."""
    cfg = [_conv(32, 3)]
    stage_ends = []
    for filters, blocks in DARKNET53_STAGES:
        cfg.append(_conv(filters, 3, 2))
        for _ in range(blocks):
            cfg += [_conv(filters // 2, 1), _conv(filters, 3), {"type": "shortcut", "from": -3}]
        stage_ends.append(len(cfg) - 1)  # 4, 11, 36, 61, 74
    skips = [None, stage_ends[3], stage_ends[2]]  # route -1, 61 and route -1, 36
    for scale, mask in enumerate(HEAD["masks"]):
        f = 512 >> scale
        if scale:
            cfg += [{"type": "route", "layers": [-4]}, _conv(f, 1), {"type": "upsample", "stride": 2},
                    {"type": "route", "layers": [-1, skips[scale]]}]
        cfg += [_conv(f, 1), _conv(2 * f, 3)] * 3
        cfg += [_conv(3 * (5 + num_classes), 1, bn=False), {"type": "yolo", "mask": mask}]
    return cfg


@register("yolov3", input_size=416, task="detection", weights_format="darknet", preprocess=DARKNET,
          labels="coco", num_classes=80, weights_file="yolov3.weights", head=HEAD)
def yolov3(num_classes=80, input_shape=(416, 416, 3)):
    inputs = keras.Input(input_shape, name="input")
    outs, heads, x = [], [], inputs
    for i, layer in enumerate(cfg_layers(num_classes)):
        kind = layer["type"]
        if kind == "convolutional":
            x = conv_bn(x, layer["filters"], layer["size"], layer["stride"], f"conv_{i}",
                        f"bn_{i}" if layer["bn"] else None, act="leaky" if layer["bn"] else None, eps=BN_EPS)
        elif kind == "shortcut":
            x = layers.Add(name=f"shortcut_{i}")([x, outs[i + layer["from"]]])
        elif kind == "route":
            srcs = [outs[j if j >= 0 else i + j] for j in layer["layers"]]
            x = srcs[0] if len(srcs) == 1 else layers.Concatenate(name=f"route_{i}")(srcs)
        elif kind == "upsample":
            x = layers.UpSampling2D(layer["stride"], interpolation="nearest", name=f"upsample_{i}")(x)
        elif kind == "yolo":
            heads.append(x)  # raw map; the yolo layer's sigmoid/exp happen in decode_yolo
        outs.append(x)
    return keras.Model(inputs, heads, name="yolov3")
