"""Weights of the models trained here (`tools/train_synthetic.py`), shipped in the package as
`edge_cbn/convert/models/weights/<weights_file>`: a torch-layout state dict (`{conv}.weight`, `{conv}.bias`,
`{bn}.weight`, `{bn}.bias`, `{bn}.running_mean`, `{bn}.running_var`) in a numpy `.npz`.  It is read without
pickle and without torch, and assigned by the same code as a `.pth` (`assign_state_dict`), so the layer
names are the keys, as for every model of the zoo."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ...runtime.errors import BadInput
from .assign import WeightMismatch, assign_state_dict, keras_to_torch, layer_kind
from .checks import MismatchedWeightFile, check_values

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "models" / "weights"


def shipped_weights(spec) -> str | None:
    """The weight file the package ships for `spec` (weights_format "npz"), if it is there."""
    if spec.weights_format != "npz":
        return None
    path = SHIPPED_DIR / spec.weights_file
    return str(path) if path.is_file() else None


def state_dict(model) -> dict[str, np.ndarray]:
    """`model`'s conv/depthwise/dense/BN tensors as a torch-layout state dict (what `assign_state_dict`
    reads back)."""
    sd = {}
    for layer in model.layers:
        kind = layer_kind(layer)
        if kind == "bn":
            gamma, beta, mean, var = layer.get_weights()
            sd.update({f"{layer.name}.weight": gamma, f"{layer.name}.bias": beta,
                       f"{layer.name}.running_mean": mean, f"{layer.name}.running_var": var})
        elif kind is not None:
            kernel, *bias = layer.get_weights()
            sd[f"{layer.name}.weight"] = keras_to_torch(kind, kernel)
            if bias:
                sd[f"{layer.name}.bias"] = bias[0]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def save_npz(model, path) -> Path:
    """Write `model`'s weights as an uncompressed `.npz` state dict; returns the path."""
    path = Path(path)
    with open(path, "wb") as f:  # a file object: numpy would otherwise append ".npz" to other names
        np.savez(f, **state_dict(model))
    return path


def read_npz(path) -> dict[str, np.ndarray]:
    """The state dict in the `.npz` at `path` (no pickles), every tensor finite, every BN variance >= 0."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            sd = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BadInput(path, f"is no readable numpy .npz weight file ({e})") from None
    for name, array in sd.items():
        check_values(path, name, array, variance=name.endswith(".running_var"))
    return sd


def load_npz(model, path) -> None:
    """Fill `model` from the `.npz` state dict at `path`; MismatchedWeightFile when it does not fit."""
    try:
        assign_state_dict(model, read_npz(path))
    except WeightMismatch as e:
        raise MismatchedWeightFile(path, str(e)) from None
