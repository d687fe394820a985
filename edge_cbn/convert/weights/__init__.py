"""Load published weight files into the Keras ports: torchvision / lukemelas `.pth`, Darknet `.weights`.
Every file that cannot be used, or does not fit the model, raises `BadInput` naming the file and the
reason (`MismatchedWeightFile`, also a `WeightMismatch`, when it does not fit)."""
from __future__ import annotations

import importlib

from ..models import ignored_prefixes
from . import torch_pickle
from .assign import WeightMismatch, assign_state_dict
from .checks import MismatchedWeightFile
from .darknet import assign_darknet


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
    """Fill `model` (built from `spec`) from the weight file at `path`; raises BadInput naming the file
    and the tensor or global at fault."""
    if spec.weights_format == "darknet":
        assign_darknet(model, path)
        return
    # The model's float32 parameter bytes widen the reader's memory budget beyond the file's own size.
    state = torch_pickle.load(path, expected_bytes=4 * model.count_params())
    try:
        assign_state_dict(model, state, ignore_prefixes=ignored_prefixes(spec.name))
    except WeightMismatch as e:
        raise MismatchedWeightFile(path, str(e)) from None


__all__ = ["WeightMismatch", "MismatchedWeightFile", "load_weights", "default_weights"]
