"""Build a registered model with its published weights, and export it as a bundle: what `convert` and
a stream's first use of a registered name do."""
from __future__ import annotations

from pathlib import Path

import click

from . import models as zoo
from ..runtime.labels import load_labels
from ..runtime.validation import regular_file
from .weights import default_weights, load_weights
from .weights.npz import load_npz, shipped_weights


class MissingWeights(ValueError):
    """A model needs its weight file and none was given (nothing is downloaded at run time)."""


def say(msg: str, quiet: bool) -> None:
    """A progress line on stderr, unless `quiet`."""
    if not quiet:
        click.echo(msg, err=True)


def build_model(name: str, weights: str | None = None, *, input_size=None, num_classes=None,
                allow_random=False, quiet=True):
    """(spec, Keras model) for registered `name` with weights from `weights`, or from the file a package
    ships.

    Args:
        name: a registered model (`edge-cbn models` lists them).
        weights: the weight file (.pth, .safetensors, .weights, .npz); None: the one a package ships.
        input_size: build at this input size instead of the model's own.
        num_classes: build with this many classes instead of the model's own.
        allow_random: with no weight file, keep the random initial weights instead of raising.
        quiet: no progress lines on stderr.

    Returns:
        (the registry's `ModelSpec`, the Keras model).

    Raises:
        KeyError: an unknown name.
        MissingWeights: no weight file and not `allow_random`.
        BadInput: a weight file that cannot be used or does not fit (naming the file).
    """
    spec = zoo.get_spec(name)
    weights = weights or default_weights(spec) or shipped_weights(spec)
    if weights is None and not allow_random:
        raise MissingWeights(
            f"{name} needs its weight file ({spec.weights_file or 'the published weights'}): pass --weights FILE "
            "(no weights are downloaded at run time)")
    say(f"building {name}", quiet)
    model = zoo.build(name, num_classes=num_classes, input_size=input_size)
    if weights is not None:
        regular_file(weights)  # a FIFO given as --weights would block the reader forever
        say(f"loading weights from {weights}", quiet)
        if spec.weights_format == "npz":  # the models trained here (tools/train_synthetic.py)
            load_npz(model, weights)
        else:
            load_weights(model, spec, weights)
    return spec, model


def export_model(spec, model, out, *, quiet=True, noise_layers=None, input_as_conv=False, calibration=True,
                 sweep=True) -> Path:
    """Fold BN and export `model` (described by `spec`) to `out` (.tflite) with its sidecar and, with
    `calibration`, its calibration variant and (with `sweep`) its sweep variant; `noise_layers` names the noise
    targets (None: every weight layer); `input_as_conv` as `export.export` (a model of one's own, whose first layer
    may be a conv)."""
    from .export import export  # lazy: TensorFlow (the converter), only when exporting

    labels = list(spec.labels) if isinstance(spec.labels, tuple) else load_labels(spec.labels)
    if spec.task in ("classification", "segmentation") and model.output_shape[-1] != len(labels):
        labels = [f"class {i}" for i in range(model.output_shape[-1])]
    say(f"folding BatchNorm and converting to TFLite (about 5-15 s) -> {out}", quiet)
    path = Path(export(model, out, name=spec.name, task=spec.task, preprocess=spec.preprocess, labels=labels,
                       head=spec.head, noise_layers=noise_layers, input_as_conv=input_as_conv,
                       calibration=calibration, sweep=sweep))
    if not any(type(layer).__name__ == "BatchNormalization" for layer in model.layers):
        say(f"note: {spec.name} has no BatchNormalization layer: there is nothing to calibrate, and it streams "
            "under noise as it is", quiet)
    return path
