"""Workstation side: build a registered model, load its published weights, fold BN and export the
`.tflite` + re-fuse sidecar (optionally after offline BN calibration).  `tools/convert.py` and
`edge-cbn convert` are this module's CLI."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import models as zoo
from .cli import noise_options as cli_noise_options
from .labels import load_labels
from .noise import PRESETS as NOISE_PRESETS
from .weights import default_weights, load_weights
from .weights.torch_pickle import UnsafeCheckpoint


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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_batches(directory, spec, input_size, batch_size, max_images=None):
    """(number of images, generator of preprocessed NHWC float32 batches) from the images in
    `directory`, resized (squashed) to the model input as the runtime does."""
    import cv2
    import numpy as np

    from .runtime import normalise

    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
    if not files:
        raise click.BadParameter(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}",
                                 param_hint="--calibrate")
    def load(path):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise click.ClickException(f"cannot read image {path}")
        rgb = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (input_size, input_size),
                         interpolation=cv2.INTER_AREA)
        return normalise(rgb, spec.preprocess)

    def gen():
        for i in range(0, len(files), batch_size):
            yield np.stack([load(f) for f in files[i:i + batch_size]])

    return len(files), gen()


def calibrate_offline(spec, model, directory, *, noise, eta, seed, batch_size, momentum, estimator,
                      max_images=None, quiet=True, noise_options=None) -> None:
    """Algorithm 1 over the images in `directory` under the given noise (`noise_options`: make_noise
    keywords), in place on `model`."""
    from .calibrate import calibrate, noisy_layers
    from .noise import make_noise

    side = model.input_shape[1]
    n, batches = image_batches(directory, spec, side, batch_size, max_images)
    chip = None if noise == "none" else make_noise(noise, eta, seed, **(noise_options or {})).instantiate(
        noisy_layers(model))
    label = f"calibrating BN ({estimator}, noise {noise} eta={eta} seed {seed}, batch {batch_size})"
    with click.progressbar(length=n, label=label, hidden=quiet) as bar:
        calibrate(model, batches, chip=chip, estimator=estimator, momentum=momentum, progress=bar.update)


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
@click.option("--calibrate", "calib_dir", type=click.Path(exists=True, file_okay=False),
              help="Re-estimate BN statistics offline (paper Algorithm 1) on the images in this folder before "
                   "exporting, under the noise given by --noise/--eta/--seed.")
@click.option("--noise", type=click.Choice(NOISE_PRESETS), default="none", show_default=True,
              help="Noise preset simulated during --calibrate (see docs/NOISE.md).")
@click.option("--eta", type=float, default=0.05, show_default=True, help="Noise scale eta0.")
@click.option("--seed", type=int, default=0, show_default=True, help="Chip seed (same seed = same chip).")
@click.option("--noise-option", "noise_option", multiple=True, metavar="KEY=VALUE",
              help="Override an option of the --noise preset, repeatable, e.g. t_granularity=weight "
                   "(docs/NOISE.md).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Calibration batch size.")
@click.option("--momentum", type=float, default=0.999, show_default=True,
              help="EMA momentum m of Algorithm 1 (estimator ema).")
@click.option("--estimator", type=click.Choice(["ema", "cumulative"]), default="cumulative", show_default=True,
              help="ema: Algorithm 1 from the source statistics; cumulative: equal-weight average of all "
                   "batches (torch update_bn / AIMET). With few images EMA 0.999 barely moves.")
@click.option("--max-images", type=int, help="Use at most this many calibration images.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def main(model_name, weights, out, input_size, num_classes, random_weights, calib_dir, noise, eta, seed,
         noise_option, batch_size, momentum, estimator, max_images, quiet):
    """Build MODEL, load its weights, optionally calibrate BN statistics offline under simulated noise,
    fold every BatchNorm and export a float32 TFLite model plus the sidecar and calibration variant
    that on-device re-fusing needs."""
    if not out.endswith(".tflite"):
        raise click.BadParameter("the output must end in .tflite", param_hint="-o")
    noise_options = cli_noise_options(noise, noise_option)
    try:
        spec, model = build_model(model_name, weights, input_size=input_size, num_classes=num_classes,
                                  allow_random=random_weights, quiet=quiet)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--model") from None
    except (ValueError, OSError, UnsafeCheckpoint) as e:  # WeightMismatch, unreadable file: one clear line
        raise click.ClickException(str(e)) from None
    if calib_dir:
        calibrate_offline(spec, model, calib_dir, noise=noise, eta=eta, seed=seed, batch_size=batch_size,
                          momentum=momentum, estimator=estimator, max_images=max_images, quiet=quiet,
                          noise_options=noise_options)
    path = export_model(spec, model, out, quiet=quiet)
    _say(f"wrote {path} and {path.with_suffix('.cbn.npz').name}", quiet)


if __name__ == "__main__":
    sys.exit(main())
