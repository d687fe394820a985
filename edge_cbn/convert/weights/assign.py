"""Put a torch-layout state dict (name -> numpy array) into a Keras model whose layer names are the
state-dict prefixes (`layer1.0.conv1` <- `layer1.0.conv1.weight`)."""
from __future__ import annotations

import numpy as np


class WeightMismatch(ValueError):
    """A weight file that does not fit the model; the message names the tensor."""


_BN_KEYS = ("weight", "bias", "running_mean", "running_var")
# Keys a checkpoint may carry that no inference layer needs.
_IGNORED_SUFFIXES = (".num_batches_tracked",)


# Axis permutation Keras layout -> torch layout: conv HWIO -> OIHW, depthwise HWC1 -> C1HW, dense IO -> OI.
_TO_TORCH = {"conv": (3, 2, 0, 1), "depthwise": (2, 3, 0, 1), "dense": (1, 0)}


def keras_to_torch(kind: str, w: np.ndarray) -> np.ndarray:
    return w.transpose(_TO_TORCH[kind])


def torch_to_keras(kind: str, w: np.ndarray) -> np.ndarray:
    return w.transpose(np.argsort(_TO_TORCH[kind]))


def layer_kind(layer) -> str | None:
    """'conv' | 'depthwise' | 'dense' | 'transpose' | 'bn' | None, by Keras class."""
    cls = type(layer).__name__
    return {"Conv2D": "conv", "DepthwiseConv2D": "depthwise", "Dense": "dense", "Conv2DTranspose": "transpose",
            "BatchNormalization": "bn"}.get(cls)


def _take(sd: dict, key: str, shape: tuple, used: set) -> np.ndarray:
    if key not in sd:
        raise WeightMismatch(f"tensor {key!r} is missing from the weight file")
    arr = np.asarray(sd[key], dtype=np.float32)
    if arr.shape != tuple(shape):
        raise WeightMismatch(f"tensor {key!r} has shape {arr.shape}, the model needs {tuple(shape)}")
    used.add(key)
    return arr


def assign_state_dict(model, state_dict: dict, *, strict: bool = True, ignore_prefixes: tuple = ()) -> None:
    """Copy every conv/dense/BN tensor into `model`.  Missing or misshapen tensors raise WeightMismatch
    naming the tensor; with `strict`, so do tensors the model has no place for (except `ignore_prefixes`)."""
    used: set[str] = set()
    for layer in model.layers:
        kind = layer_kind(layer)
        if kind is None:
            continue
        name = layer.name
        if kind == "bn":
            c = layer.gamma.shape[0] if layer.gamma is not None else layer.moving_mean.shape[0]
            vals = [_take(state_dict, f"{name}.{k}", (c,), used) for k in _BN_KEYS]
            gamma, beta, mean, var = vals
            layer.set_weights([gamma, beta, mean, var])
            continue
        kernel = layer.weights[0]
        torch_shape = keras_to_torch(kind, np.zeros(kernel.shape, np.float32)).shape
        w = torch_to_keras(kind, _take(state_dict, f"{name}.weight", torch_shape, used))
        weights = [w]
        if len(layer.weights) > 1:
            weights.append(_take(state_dict, f"{name}.bias", tuple(layer.weights[1].shape), used))
        layer.set_weights(weights)
    if strict:
        extra = [k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                 and not k.startswith(ignore_prefixes)]
        if extra:
            raise WeightMismatch(f"the weight file has {len(extra)} tensor(s) the model does not use, "
                                 f"e.g. {extra[0]!r} — wrong model for this file?")


def random_state_dict(model, seed: int = 0) -> dict:
    """A torch-layout state dict of random weights for `model`, with non-trivial BN statistics so
    parity and folding tests exercise every term."""
    rng = np.random.default_rng(seed)
    sd = {}
    for layer in model.layers:
        kind = layer_kind(layer)
        if kind is None:
            continue
        if kind == "bn":
            c = layer.moving_mean.shape[0]
            sd[f"{layer.name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            sd[f"{layer.name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
            sd[f"{layer.name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
            sd[f"{layer.name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            continue
        kernel = layer.weights[0]
        shape = keras_to_torch(kind, np.zeros(kernel.shape, np.float32)).shape
        fan_in = int(np.prod(shape[1:]))
        sd[f"{layer.name}.weight"] = (rng.normal(0, 1, shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if len(layer.weights) > 1:
            sd[f"{layer.name}.bias"] = rng.normal(0, 0.1, tuple(layer.weights[1].shape)).astype(np.float32)
    return sd
