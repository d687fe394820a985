"""Workstation side: build a registered model, load its published weights, fold BN and export the
`.tflite` + re-fuse sidecar (optionally after offline BN calibration).  `tools/convert.py` and
`edge-cbn convert` are this module's CLI."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import models as zoo
from .labels import load_labels
from .weights import default_weights, load_weights


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        click.echo(msg, err=True)


def build_model(name: str, weights: str | None = None, *, input_size=None, num_classes=None,
                allow_random=False, quiet=True):
    """The Keras model for `name` with weights from `weights`, or from the file a package ships."""
    spec = zoo.get_spec(name)
    weights = weights or default_weights(spec)
    if weights is None and not allow_random:
        raise click.UsageError(
            f"{name} needs its weight file ({spec.weights_file or 'the published weights'}): pass --weights FILE "
            "(no weights are downloaded at run time)")
    _say(f"building {name}", quiet)
    model = zoo.build(name, num_classes=num_classes, input_size=input_size)
    if weights is not None:
        _say(f"loading weights from {weights}", quiet)
        load_weights(model, spec, weights)
    return spec, model


def export_model(spec, model, out, *, quiet=True) -> Path:
    from .export import export
    from .models import yolov3

    labels = load_labels(spec.labels)
    if model.output_shape[-1] != len(labels) and spec.task != "detection":
        labels = [f"class {i}" for i in range(model.output_shape[-1])]
    _say(f"folding BatchNorm and converting to TFLite (about 5-15 s) -> {out}", quiet)
    head = yolov3.HEAD if spec.task == "detection" else None
    return Path(export(model, out, name=spec.name, task=spec.task, preprocess=spec.preprocess,
                       labels=labels, head=head))


@click.command("convert")
@click.option("--model", "model_name", required=True, help="Registered model name (see `edge-cbn models`).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="Published weight file: torchvision/lukemelas .pth or Darknet .weights. "
                   "Default: the file a package ships (efficientnet_lite0 only).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Output .tflite; the re-fuse sidecar is written beside it as .cbn.npz.")
@click.option("--input-size", type=int, help="Square input side in pixels (default: the model's).")
@click.option("--num-classes", type=int, help="Number of classes (default: the model's).")
@click.option("--random-weights", is_flag=True, help="Export with random weights (for tests and benchmarks).")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def main(model_name, weights, out, input_size, num_classes, random_weights, quiet):
    """Build MODEL, load its weights, fold every BatchNorm and export a float32 TFLite model plus the
    sidecar that on-device re-fusing needs."""
    if not out.endswith(".tflite"):
        raise click.BadParameter("the output must end in .tflite", param_hint="-o")
    try:
        spec, model = build_model(model_name, weights, input_size=input_size, num_classes=num_classes,
                                  allow_random=random_weights, quiet=quiet)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--model") from None
    except (ValueError, OSError) as e:  # WeightMismatch, UnsafeCheckpoint, unreadable file: one clear line
        raise click.ClickException(str(e)) from None
    path = export_model(spec, model, out, quiet=quiet)
    _say(f"wrote {path} and {path.with_suffix('.cbn.npz').name}", quiet)


if __name__ == "__main__":
    sys.exit(main())
