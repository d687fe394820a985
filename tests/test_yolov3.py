"""YOLOv3: Keras port against an independent torch-functional Darknet-53 + head, the darknet weight
format (handwritten fixture files, truncation/leftover refusal, header variants, full-size round trip)
and the device-side decode / NMS / letterbox."""
import math
import re

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from edge_cbn.runtime import detection
from edge_cbn.convert import models  # noqa: E402
from edge_cbn.convert.models.yolov3 import HEAD  # noqa: E402
from edge_cbn.convert.weights.assign import (  # noqa: E402
    WeightMismatch, assign_state_dict, keras_to_torch, layer_kind, random_state_dict)
from edge_cbn.convert.weights.darknet import assign_darknet, load_darknet, save_darknet  # noqa: E402

YOLOV3_WEIGHTS_BYTES = 248_007_048  # the published yolov3.weights: 20-byte header + 62,001,757 floats


class TorchDarknet:
    """Darknet-53 + YOLOv3 head with torch.nn.functional, counting cfg layer indices as darknet does."""

    def __init__(self, sd):
        self.sd, self.i = sd, 0

    def _t(self, key):
        return torch.from_numpy(np.asarray(self.sd[key], np.float64))

    def skip(self):  # a layer without weights (shortcut, route, upsample, yolo)
        self.i += 1

    def conv(self, x, stride=1):
        i, self.i = self.i, self.i + 1
        w = self._t(f"conv_{i}.weight")
        if f"bn_{i}.weight" not in self.sd:  # linear conv with bias feeding a yolo layer
            return F.conv2d(x, w, self._t(f"conv_{i}.bias"), stride, padding=w.shape[-1] // 2)
        y = F.conv2d(x, w, None, stride, padding=w.shape[-1] // 2)
        y = F.batch_norm(y, self._t(f"bn_{i}.running_mean"), self._t(f"bn_{i}.running_var"),
                         self._t(f"bn_{i}.weight"), self._t(f"bn_{i}.bias"), training=False, eps=1e-5)
        return F.leaky_relu(y, 0.1)

    def forward(self, x):
        x = self.conv(x)
        stages = []
        for blocks in (1, 2, 8, 8, 4):
            x = self.conv(x, 2)
            for _ in range(blocks):
                x = x + self.conv(self.conv(x))
                self.skip()
            stages.append(x)
        outs = []
        for scale in range(3):
            if scale:
                self.skip()  # route -4
                x = F.interpolate(self.conv(branch), scale_factor=2, mode="nearest")
                self.skip()  # upsample
                x = torch.cat([x, stages[4 - scale]], 1)  # route -1, 61 / -1, 36
                self.skip()
            for _ in range(5):
                x = self.conv(x)
            branch = x
            outs.append(self.conv(self.conv(x)))
            self.skip()  # yolo
        assert self.i == 107
        return outs


@pytest.fixture(scope="module")
def yolo_96():
    model = models.build("yolov3", input_size=96)
    sd = random_state_dict(model, seed=3)
    assign_state_dict(model, sd)
    return model, sd


def test_registry_and_head():
    spec = models.get_spec("yolov3")
    assert (spec.input_size, spec.task, spec.weights_format, spec.labels, spec.num_classes, spec.weights_file) == (
        416, "detection", "darknet", "coco", 80, "yolov3.weights")
    assert spec.preprocess == models.DARKNET
    assert HEAD["masks"] == [[6, 7, 8], [3, 4, 5], [0, 1, 2]] and HEAD["strides"] == [32, 16, 8]
    assert HEAD["anchors"][6:] == [[116, 90], [156, 198], [373, 326]] and len(HEAD["anchors"]) == 9


def test_parity_with_torch_reference(yolo_96):
    model, sd = yolo_96
    x = np.random.default_rng(0).uniform(0, 1, (1, 96, 96, 3)).astype(np.float32)
    got = model.predict(x, verbose=0)
    with torch.no_grad():
        want = TorchDarknet(sd).forward(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)))
    assert [g.shape for g in got] == [(1, 3, 3, 255), (1, 6, 6, 255), (1, 12, 12, 255)]
    for g, w in zip(got, want):
        w = w.numpy().transpose(0, 2, 3, 1)
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max() + 1e-6


def test_num_classes_sets_head_channels():
    model = models.build("yolov3", input_size=64, num_classes=3)
    assert [tuple(o.shape[1:]) for o in model.outputs] == [(2, 2, 24), (4, 4, 24), (8, 8, 24)]


def test_full_size_darknet_round_trip(yolo_96, tmp_path):
    model, sd = yolo_96
    path = tmp_path / "yolov3.weights"
    save_darknet(model, path)
    assert path.stat().st_size == YOLOV3_WEIGHTS_BYTES  # same float count as the published file
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([np.zeros(w.shape, np.float32) for w in layer.weights])
    header = assign_darknet(model, path)
    assert header == {"major": 0, "minor": 2, "revision": 0, "seen": 0}
    for layer in model.layers:
        kind = layer_kind(layer)
        if kind == "bn":
            got = dict(zip(("weight", "bias", "running_mean", "running_var"), layer.get_weights()))
        elif kind == "conv":
            got = dict(zip(("weight", "bias"), layer.get_weights()))
            got["weight"] = keras_to_torch("conv", got["weight"])
        else:
            continue
        for key, value in got.items():
            np.testing.assert_array_equal(value, sd[f"{layer.name}.{key}"])


# A tiny darknet-style model: conv_0 + bn_0, conv_2 + bn_2, conv_10 with bias (numeric, not string, order).
def _tiny_model():
    x = inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, 2, "same", use_bias=False, name="conv_0")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5, name="bn_0")(x)
    x = keras.layers.Conv2D(5, 1, use_bias=False, name="conv_2")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5, name="bn_2")(x)
    x = keras.layers.Conv2D(6, 1, name="conv_10")(x)
    return keras.Model(inputs, x)


def _tiny_tensors(seed=0):
    """File-order tensors for the tiny model: (name, array) with kernels OIHW."""
    rng = np.random.default_rng(seed)
    out = []
    for conv, bn, o, i, k in [("conv_0", "bn_0", 4, 3, 3), ("conv_2", "bn_2", 5, 4, 1), ("conv_10", None, 6, 5, 1)]:
        pre = [f"{bn}.beta", f"{bn}.gamma", f"{bn}.mean", f"{bn}.var"] if bn else [f"{conv}.bias"]
        out += [(name, rng.uniform(0.5, 1.5, o).astype(np.float32)) for name in pre]
        out.append((f"{conv}.kernel", rng.normal(0, 1, (o, i, k, k)).astype(np.float32)))
    return out


def _write(path, tensors, version=(0, 2, 0), seen=1234, extra=0):
    major, minor, _ = version
    seen_type = "<i8" if major * 10 + minor >= 2 else "<i4"
    floats = np.concatenate([t.ravel() for _, t in tensors] + [np.ones(extra, np.float32)])
    path.write_bytes(np.array(version, "<i4").tobytes() + np.array([seen], seen_type).tobytes()
                     + floats.astype("<f4").tobytes())
    return path


@pytest.mark.parametrize("version", [(0, 1, 0), (0, 2, 0), (1, 0, 0)])
def test_handwritten_file_loads_with_header_variants(version, tmp_path):
    tensors = dict(_tiny_tensors())
    path = _write(tmp_path / "tiny.weights", list(tensors.items()), version)
    header, floats = load_darknet(path)
    assert header == dict(zip(("major", "minor", "revision"), version), seen=1234)
    assert floats.size == sum(t.size for t in tensors.values())
    model = _tiny_model()
    assign_darknet(model, path)
    gamma, beta, mean, var = model.get_layer("bn_2").get_weights()
    np.testing.assert_array_equal(np.stack([beta, gamma, mean, var]),
                                  np.stack([tensors[f"bn_2.{k}"] for k in ("beta", "gamma", "mean", "var")]))
    kernel, bias = model.get_layer("conv_10").get_weights()
    np.testing.assert_array_equal(bias, tensors["conv_10.bias"])
    np.testing.assert_array_equal(kernel, tensors["conv_10.kernel"].transpose(2, 3, 1, 0))
    # save_darknet writes the very same bytes back
    save_darknet(model, tmp_path / "again.weights", version=version, seen=1234)
    assert (tmp_path / "again.weights").read_bytes() == path.read_bytes()


# The tiny file holds 200 floats: conv_0 4*4 + 4*3*3*3 = 124, conv_2 4*5 + 5*4 = 40, conv_10 6 + 6*5 = 36.
@pytest.mark.parametrize("drop, where", [(1, "'conv_10.kernel' (needs 30 floats at float 170, only 29 left"),
                                         (200 - (124 + 12), "'bn_2.mean' (needs 5 floats at float 134, only 2 left")])
def test_truncated_file_is_refused(drop, where, tmp_path):
    tensors = _tiny_tensors()
    path = _write(tmp_path / "cut.weights", tensors)
    path.write_bytes(path.read_bytes()[:-4 * drop])
    model = _tiny_model()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(WeightMismatch, match=re.escape(where)):
        assign_darknet(model, path)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # untouched


def test_file_with_extra_floats_is_refused(tmp_path):
    path = _write(tmp_path / "long.weights", _tiny_tensors(), extra=3)
    with pytest.raises(WeightMismatch, match="3 floats left over"):
        assign_darknet(_tiny_model(), path)


# ---- device side: decode, NMS, letterbox ----

def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def _decode_loop(outputs, input_hw, head, thr):
    """Straightforward per-cell, per-anchor, per-class darknet decode."""
    boxes, scores, ids = [], [], []
    for out, mask, stride in zip(outputs, head["masks"], head["strides"]):
        _, h, w, ch = out.shape
        n = ch // len(mask)
        for cy in range(h):
            for cx in range(w):
                for a, anchor in enumerate(mask):
                    t = out[0, cy, cx, a * n:(a + 1) * n].astype(np.float64)
                    x, y = (_sig(t[0]) + cx) * stride, (_sig(t[1]) + cy) * stride
                    bw, bh = math.exp(t[2]) * head["anchors"][anchor][0], math.exp(t[3]) * head["anchors"][anchor][1]
                    for c in range(n - 5):
                        s = _sig(t[4]) * _sig(t[5 + c])
                        if s > thr:
                            boxes.append([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2])
                            scores.append(s)
                            ids.append(c)
    return np.array(boxes), np.array(scores), np.array(ids)


def test_decode_matches_loop_reference():
    rng = np.random.default_rng(5)
    input_hw, classes = (64, 96), 3  # non-square: grids 2x3, 4x6, 8x12
    outputs = [rng.normal(0, 2, (1, 64 // s, 96 // s, 3 * (5 + classes))).astype(np.float32)
               for s in HEAD["strides"]]
    boxes, scores, ids = detection.decode_yolo(outputs, input_hw, HEAD, conf_threshold=0.3)
    want_boxes, want_scores, want_ids = _decode_loop(outputs, input_hw, HEAD, 0.3)
    assert len(want_scores) > 20 and boxes.shape == (len(want_scores), 4)
    np.testing.assert_allclose(boxes, want_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    np.testing.assert_array_equal(ids, want_ids)
    with pytest.raises(ValueError):
        detection.decode_yolo(outputs, (96, 64), HEAD, 0.3)


def test_nms_hand_made_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95])
    ids = np.array([0, 0, 1, 0, 0])
    # IoU(4,0) = 0.5, IoU(0,1) = 81/119 = 0.68, IoU(4,1) = 36/114; box 2 is another class
    assert detection.nms(boxes, scores, ids, 0.45).tolist() == [4, 1, 2, 3]  # 0 falls to 4, so 1 survives
    assert detection.nms(boxes, scores, ids, 0.6).tolist() == [4, 0, 2, 3]
    assert detection.nms(boxes, scores, np.zeros(5), 0.6).tolist() == [4, 0, 3]  # class-agnostic: 2 goes too
    assert detection.nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).tolist() == []


def test_letterbox_and_unletterbox():
    image = np.full((100, 200, 3), 200, np.uint8)
    canvas, scale, pad = detection.letterbox(image, 416)
    assert canvas.shape == (416, 416, 3) and canvas.dtype == np.float32
    assert scale == pytest.approx(2.08) and pad == (0, 104)
    assert (canvas[:104] == 127.5).all() and (canvas[312:] == 127.5).all() and (canvas[104:312] == 200).all()
    back = detection.unletterbox([[0, 104, 416, 312], [-5, 0, 208, 208]], scale, pad, image.shape[:2])
    np.testing.assert_allclose(back, [[0, 0, 200, 100], [0, 0, 100, 50]], atol=1e-4)
