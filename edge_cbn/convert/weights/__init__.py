"""Load published weight files into the Keras ports: torchvision / lukemelas `.pth`, `.safetensors` of the
same names, Darknet `.weights`.
Every file that cannot be used, or does not fit the model, raises `BadInput` naming the file and the
reason (`MismatchedWeightFile`, also a `WeightMismatch`, when it does not fit)."""
from __future__ import annotations

import importlib

from ..models import ignored_prefixes
from ...runtime.validation import regular_file
from . import safetensors_file, torch_pickle
from .assign import WeightMismatch, assign_state_dict
from .checks import MismatchedWeightFile, check_published_hash
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
    """Fill `model` (built from `spec`) from the weight file at `path`: Darknet `.weights` for a Darknet
    model, else a torch `.pth` or a `.safetensors` file of the same state-dict names (told apart by their
    first bytes).  A file under a published name that carries its sha256 prefix must match it.

    Args:
        model: the Keras model built from `spec`.
        spec: its registry entry (`convert.models.get_spec`).
        path: the weight file.

    Raises:
        BadInput: the file cannot be used (naming the file and the tensor or global at fault), or does not
            fit the model (`MismatchedWeightFile`).
    """
    check_published_hash(regular_file(path))
    if spec.weights_format == "darknet":
        assign_darknet(model, path)
        return
    with open(path, "rb") as f:
        head = f.read(16)
    if safetensors_file.looks_like_safetensors(head):
        state = safetensors_file.load(path)
    else:  # the model's float32 parameter bytes widen the reader's memory budget beyond the file's own size
        state = torch_pickle.load(path, expected_bytes=4 * model.count_params())
    try:
        assign_state_dict(model, state, ignore_prefixes=ignored_prefixes(spec.name))
    except WeightMismatch as e:
        raise MismatchedWeightFile(path, str(e)) from None


__all__ = ["WeightMismatch", "MismatchedWeightFile", "load_weights", "default_weights"]
