"""torchvision ResNets (v1.5) and FCN-ResNet segmentation models in Keras, layer-for-layer.

In the style of `keras/applications/resnet.py`: one function per block type (`basic_block`,
`bottleneck_block`), one stage function (`stack`), one backbone (`resnet_backbone`) and two heads
(`_classification_model`, `_fcn_model`).  Every Keras layer that holds weights is named by its
torchvision state-dict prefix (`layer1.0.conv1`, `layer2.0.downsample.0`, `fc`; FCN models prefix the
backbone with `backbone.` and name the head `classifier.0`/`.1`/`.4`), so
`edge_cbn.convert.weights.assign.assign_state_dict` loads a torchvision `.pth` state dict directly.  Layers
without weights are named `<weight layer>_pad`, `<bn>_relu`, `<block>.add`, `<block>.out`, `maxpool`, ...

Padding: torchvision pads symmetrically (`padding=k//2 * dilation`), which Keras `padding="same"` does
not do for stride 2, so every conv is an explicit `ZeroPadding2D` followed by a `padding="valid"` conv.

Architecture details that follow torchvision exactly:
- Bottleneck puts the stride on the 3x3 conv (`conv2`), i.e. ResNet v1.5; width of the inner convs is
  `planes * width_per_group / 64` (128 for Wide ResNet-50-2), outer convs stay `planes * 4`.
- A stage gets a `downsample` (1x1 conv + BN) when its stride is not 1 or the channel count changes.
- Dilated stages (FCN: `replace_stride_with_dilation=[False, True, True]`): the stage's stride becomes 1
  and the running dilation is multiplied by the stride, but the stage's *first* block still uses the
  dilation of the previous stage; only its later blocks use the new one (layer3: 1, 2, 2, ...;
  layer4: 2, 4, 4).
- FCNHead: 3x3 conv 2048->512 (no bias) + BN + ReLU + Dropout(0.1) + 1x1 conv 512->classes (bias);
  dropout is the identity at inference and is omitted.  The logits are bilinearly resized to the input
  size with half-pixel centres (= `F.interpolate(mode="bilinear", align_corners=False)`).

torchvision's FCN checkpoints also carry the training-only auxiliary head (`aux_classifier.*`), which
these models do not build; they register `ignored_prefixes=("aux_classifier.",)`, which the loader passes
to `assign_state_dict`.
"""
from __future__ import annotations

from ..tf_import import keras
from keras import layers

from . import IMAGENET_TORCH, register

BN_EPS = 1e-5  # torch BatchNorm2d default

# State-dict prefixes in the published FCN weight files that no layer of the Keras model uses.
FCN_IGNORED_PREFIXES = ("aux_classifier.",)


def conv(x, filters, kernel, name, *, stride=1, dilation=1, use_bias=False):
    """torch `Conv2d(padding=dilation * (kernel // 2))`: symmetric zero padding + valid conv."""
    pad = dilation * (kernel // 2)
    if pad:
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    return layers.Conv2D(filters, kernel, strides=stride, dilation_rate=dilation, use_bias=use_bias,
                         name=name)(x)


def conv_bn(x, filters, kernel, conv_name, bn_name, *, stride=1, dilation=1, relu=True):
    """conv -> BN (-> ReLU); the BN directly follows its conv, as BN folding requires."""
    x = conv(x, filters, kernel, conv_name, stride=stride, dilation=dilation)
    x = layers.BatchNormalization(epsilon=BN_EPS, name=bn_name)(x)
    return layers.ReLU(name=f"{bn_name}_relu")(x) if relu else x


def _residual(x, shortcut, filters, stride, downsample, name):
    """Add the (optionally downsampled) shortcut and apply the block's closing ReLU."""
    if downsample:
        shortcut = conv_bn(shortcut, filters, 1, f"{name}.downsample.0", f"{name}.downsample.1",
                           stride=stride, relu=False)
    x = layers.Add(name=f"{name}.add")([x, shortcut])
    return layers.ReLU(name=f"{name}.out")(x)


def basic_block(x, planes, *, stride=1, dilation=1, downsample=False, width_per_group=64, name):
    """torchvision BasicBlock (expansion 1): 3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut, ReLU."""
    if dilation != 1 or width_per_group != 64:
        raise ValueError("BasicBlock supports neither dilation nor width_per_group != 64 (as torchvision)")
    y = conv_bn(x, planes, 3, f"{name}.conv1", f"{name}.bn1", stride=stride)
    y = conv_bn(y, planes, 3, f"{name}.conv2", f"{name}.bn2", relu=False)
    return _residual(y, x, planes, stride, downsample, name)


basic_block.expansion = 1


def bottleneck_block(x, planes, *, stride=1, dilation=1, downsample=False, width_per_group=64, name):
    """torchvision Bottleneck (expansion 4, v1.5): 1x1, 3x3 (stride, dilation), 1x1, + shortcut, ReLU."""
    width = int(planes * (width_per_group / 64.0))
    y = conv_bn(x, width, 1, f"{name}.conv1", f"{name}.bn1")
    y = conv_bn(y, width, 3, f"{name}.conv2", f"{name}.bn2", stride=stride, dilation=dilation)
    y = conv_bn(y, planes * 4, 1, f"{name}.conv3", f"{name}.bn3", relu=False)
    return _residual(y, x, planes * 4, stride, downsample, name)


bottleneck_block.expansion = 4


def stack(x, block, planes, blocks, *, stride, dilation, dilate, width_per_group, name):
    """torchvision `ResNet._make_layer`.  Returns (output, dilation after this stage)."""
    previous_dilation = dilation
    if dilate:
        dilation *= stride
        stride = 1
    downsample = stride != 1 or x.shape[-1] != planes * block.expansion
    x = block(x, planes, stride=stride, dilation=previous_dilation, downsample=downsample,
              width_per_group=width_per_group, name=f"{name}.0")
    for i in range(1, blocks):
        x = block(x, planes, dilation=dilation, width_per_group=width_per_group, name=f"{name}.{i}")
    return x, dilation


def resnet_backbone(inputs, block, depths, *, width_per_group=64, dilate=(False, False, False), prefix=""):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool) and layer1..layer4; returns the layer4 features."""
    x = conv_bn(inputs, 64, 7, f"{prefix}conv1", f"{prefix}bn1", stride=2)
    # torch max-pools with -inf padding; zero padding is equivalent here because the input is a ReLU
    # output (>= 0) and every 3x3 window holds at least one real pixel.
    x = layers.ZeroPadding2D(1, name=f"{prefix}maxpool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name=f"{prefix}maxpool")(x)
    dilation = 1
    for k, (planes, blocks) in enumerate(zip((64, 128, 256, 512), depths)):
        x, dilation = stack(x, block, planes, blocks, stride=1 if k == 0 else 2, dilation=dilation,
                            dilate=k > 0 and dilate[k - 1], width_per_group=width_per_group,
                            name=f"{prefix}layer{k + 1}")
    return x


def _classification_model(arch, num_classes, input_shape, block, depths, width_per_group=64):
    inputs = keras.Input(input_shape, name="input")
    x = resnet_backbone(inputs, block, depths, width_per_group=width_per_group)
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = layers.Dense(num_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name=arch)


def _fcn_model(arch, num_classes, input_shape, depths):
    """torchvision FCN: dilated ResNet (output stride 8) + FCNHead + bilinear resize to the input size."""
    inputs = keras.Input(input_shape, name="input")
    x = resnet_backbone(inputs, bottleneck_block, depths, dilate=(False, True, True), prefix="backbone.")
    x = conv_bn(x, x.shape[-1] // 4, 3, "classifier.0", "classifier.1")
    x = conv(x, num_classes, 1, "classifier.4", use_bias=True)
    # Half-pixel-centre bilinear, no antialiasing: F.interpolate(mode="bilinear", align_corners=False).
    outputs = layers.Resizing(input_shape[0], input_shape[1], interpolation="bilinear", name="upsample")(x)
    return keras.Model(inputs, outputs, name=arch)


def _imagenet(name, weights_file):
    return register(name, input_size=224, task="classification", weights_format="torchvision",
                    preprocess=IMAGENET_TORCH, labels="imagenet", num_classes=1000, weights_file=weights_file)


# torchvision evaluates FCN at resize_size=520 (shorter side); we build a square 520x520 input
# (output stride 8 -> 65x65 logits before the resize).
def _voc(name, weights_file):
    return register(name, input_size=520, task="segmentation", weights_format="torchvision",
                    preprocess=IMAGENET_TORCH, labels="voc", num_classes=21, weights_file=weights_file,
                    ignored_prefixes=FCN_IGNORED_PREFIXES)


@_imagenet("resnet18", "resnet18-f37072fd.pth")
def resnet18(num_classes=1000, input_shape=(224, 224, 3)):
    return _classification_model("resnet18", num_classes, input_shape, basic_block, (2, 2, 2, 2))


@_imagenet("resnet34", "resnet34-b627a593.pth")
def resnet34(num_classes=1000, input_shape=(224, 224, 3)):
    return _classification_model("resnet34", num_classes, input_shape, basic_block, (3, 4, 6, 3))


@_imagenet("resnet50", "resnet50-0676ba61.pth")
def resnet50(num_classes=1000, input_shape=(224, 224, 3)):
    return _classification_model("resnet50", num_classes, input_shape, bottleneck_block, (3, 4, 6, 3))


@_imagenet("resnet101", "resnet101-63fe2227.pth")
def resnet101(num_classes=1000, input_shape=(224, 224, 3)):
    return _classification_model("resnet101", num_classes, input_shape, bottleneck_block, (3, 4, 23, 3))


@_imagenet("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth")
def wide_resnet50_2(num_classes=1000, input_shape=(224, 224, 3)):
    return _classification_model("wide_resnet50_2", num_classes, input_shape, bottleneck_block,
                                 (3, 4, 6, 3), width_per_group=128)


@_voc("fcn_resnet50", "fcn_resnet50_coco-1167a1af.pth")
def fcn_resnet50(num_classes=21, input_shape=(520, 520, 3)):
    return _fcn_model("fcn_resnet50", num_classes, input_shape, (3, 4, 6, 3))


@_voc("fcn_resnet101", "fcn_resnet101_coco-7ecb50ca.pth")
def fcn_resnet101(num_classes=21, input_shape=(520, 520, 3)):
    return _fcn_model("fcn_resnet101", num_classes, input_shape, (3, 4, 23, 3))
