"""Load published weight files into the Keras ports: torchvision / lukemelas `.pth`, Darknet `.weights`."""
from __future__ import annotations

import importlib

from .assign import WeightMismatch, assign_state_dict


def default_weights(spec) -> str | None:
    """The weight file that a package installs for `spec` (its `weights_package`), when installed."""
    if not spec.weights_package:
        return None
    module, _, cls = spec.weights_package.partition(":")
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except (ImportError, AttributeError):
        return None


def load_weights(model, spec, path) -> None:
    """Fill `model` (built from `spec`) from the weight file at `path`; raises WeightMismatch or
    UnsafeCheckpoint with a message naming the tensor or global at fault."""
    if spec.weights_format == "darknet":
        from .darknet import assign_darknet
        assign_darknet(model, path)
        return
    from . import torch_pickle
    from ..models import ignored_prefixes
    assign_state_dict(model, torch_pickle.load(path), ignore_prefixes=ignored_prefixes(spec.name))


__all__ = ["WeightMismatch", "load_weights", "default_weights"]
