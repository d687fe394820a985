"""Keras ResNet / FCN-ResNet ports against an independent torch-functional reference of torchvision's
architectures, driven by the same torch-layout state dict."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from edge_cbn.convert.models import _REGISTRY  # noqa: E402
from edge_cbn.convert.models import resnet  # noqa: E402  (registers the models below)
from edge_cbn.convert.weights.assign import WeightMismatch, assign_state_dict, random_state_dict  # noqa: E402

# name -> (bottleneck?, depths, segmentation?, torchvision parameter count without the aux head)
ARCHS = {
    "resnet18": (False, (2, 2, 2, 2), False, 11_689_512),
    "resnet34": (False, (3, 4, 6, 3), False, 21_797_672),
    "resnet50": (True, (3, 4, 6, 3), False, 25_557_032),
    "resnet101": (True, (3, 4, 23, 3), False, 44_549_160),
    "wide_resnet50_2": (True, (3, 4, 6, 3), False, 68_883_240),
    # torchvision's meta counts include aux_classifier (FCNHead(1024, 21): 2_365_205 parameters)
    "fcn_resnet50": (True, (3, 4, 6, 3), True, 35_322_218 - 2_365_205),
    "fcn_resnet101": (True, (3, 4, 23, 3), True, 54_314_346 - 2_365_205),
}


# ---------------------------------------------------------------- torch-functional reference
def _conv(x, sd, p, stride=1, padding=0, dilation=1):
    return F.conv2d(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"), stride=stride, padding=padding,
                    dilation=dilation)


def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], training=False, eps=1e-5)


def _ref_block(x, sd, p, bottleneck, stride, dilation, downsample):
    if bottleneck:  # v1.5: stride on the 3x3
        out = F.relu(_bn(_conv(x, sd, f"{p}.conv1"), sd, f"{p}.bn1"))
        out = F.relu(_bn(_conv(out, sd, f"{p}.conv2", stride, dilation, dilation), sd, f"{p}.bn2"))
        out = _bn(_conv(out, sd, f"{p}.conv3"), sd, f"{p}.bn3")
    else:
        out = F.relu(_bn(_conv(x, sd, f"{p}.conv1", stride, 1), sd, f"{p}.bn1"))
        out = _bn(_conv(out, sd, f"{p}.conv2", 1, 1), sd, f"{p}.bn2")
    if downsample:
        x = _bn(_conv(x, sd, f"{p}.downsample.0", stride), sd, f"{p}.downsample.1")
    return F.relu(out + x)


def _ref_backbone(x, sd, bottleneck, depths, dilate, pre):
    x = F.relu(_bn(_conv(x, sd, f"{pre}conv1", 2, 3), sd, f"{pre}bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    inplanes, dilation, expansion = 64, 1, 4 if bottleneck else 1
    for k, (planes, n) in enumerate(zip((64, 128, 256, 512), depths)):
        stride, previous = (1 if k == 0 else 2), dilation
        if k > 0 and dilate[k - 1]:
            dilation, stride = dilation * stride, 1
        ds = stride != 1 or inplanes != planes * expansion
        x = _ref_block(x, sd, f"{pre}layer{k + 1}.0", bottleneck, stride, previous, ds)
        inplanes = planes * expansion
        for i in range(1, n):
            x = _ref_block(x, sd, f"{pre}layer{k + 1}.{i}", bottleneck, 1, dilation, False)
    return x


def reference(name, sd, x_nchw):
    bottleneck, depths, seg, _ = ARCHS[name]
    sd = {k: torch.from_numpy(v) for k, v in sd.items()}
    with torch.no_grad():
        if not seg:
            x = _ref_backbone(x_nchw, sd, bottleneck, depths, (False, False, False), "")
            return F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), sd["fc.weight"], sd["fc.bias"])
        x = _ref_backbone(x_nchw, sd, bottleneck, depths, (False, True, True), "backbone.")
        x = F.relu(_bn(_conv(x, sd, "classifier.0", 1, 1), sd, "classifier.1"))
        x = _conv(x, sd, "classifier.4")
        return F.interpolate(x, size=x_nchw.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- tests
def _assert_close(got, want):
    err = np.abs(got - want).max()
    assert err <= 1e-4 * np.abs(want).max() + 1e-5, f"max abs err {err}, max |ref| {np.abs(want).max()}"


def test_registry():
    specs = {n: s for n, s in _REGISTRY.items() if s.builder.__module__ == resnet.__name__}
    assert sorted(specs) == sorted(ARCHS)
    for name, spec in specs.items():
        seg = ARCHS[name][2]
        assert spec.task == ("segmentation" if seg else "classification")
        assert (spec.labels, spec.num_classes) == (("voc", 21) if seg else ("imagenet", 1000))
        assert spec.weights_format == "torchvision" and spec.weights_file.endswith(".pth")
        assert spec.ignored_prefixes == (("aux_classifier.",) if seg else ())


@pytest.mark.parametrize("name,side", [(n, 64) for n in ARCHS] + [("fcn_resnet50", 70)])
def test_parity_with_torch_reference(name, side):
    spec = _REGISTRY[name]
    model = spec.builder(num_classes=spec.num_classes, input_shape=(side, side, 3))
    for layer in model.layers:  # every BN directly follows a conv (BN folding needs it)
        if type(layer).__name__ == "BatchNormalization":
            assert type(layer.input._keras_history[0]).__name__ == "Conv2D", layer.name
    sd = random_state_dict(model, seed=1)
    n_params = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var")))
    assert n_params == ARCHS[name][3]
    if ARCHS[name][2]:  # real FCN checkpoints carry the auxiliary head; the loader ignores it
        sd_file = dict(sd, **{"aux_classifier.0.weight": np.zeros((256, 1024, 3, 3), np.float32)})
        with pytest.raises(WeightMismatch, match="aux_classifier"):
            assign_state_dict(model, sd_file)
        assign_state_dict(model, sd_file, ignore_prefixes=spec.ignored_prefixes)
    else:
        assign_state_dict(model, sd)

    x = np.random.default_rng(2).normal(0, 1, (1, side, side, 3)).astype(np.float32)
    got = np.asarray(model(x, training=False))
    want = reference(name, sd, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    if want.ndim == 4:
        want = want.transpose(0, 2, 3, 1)
    assert got.shape == want.shape
    _assert_close(got, want)


def test_weight_mismatch_names_the_tensor():
    model = resnet.resnet18(num_classes=10, input_shape=(32, 32, 3))
    sd = random_state_dict(model, seed=0)
    missing = dict(sd)
    del missing["layer2.0.downsample.1.running_var"]
    with pytest.raises(WeightMismatch, match=r"layer2\.0\.downsample\.1\.running_var"):
        assign_state_dict(model, missing)
    wrong = dict(sd, **{"layer3.1.conv2.weight": np.zeros((256, 256, 1, 1), np.float32)})
    with pytest.raises(WeightMismatch, match=r"layer3\.1\.conv2\.weight"):
        assign_state_dict(model, wrong)
