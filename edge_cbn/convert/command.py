"""`tools/convert.py` / `edge-cbn convert` (build, load the published weights, optionally calibrate
offline, fold and export) and `edge-cbn models` (the zoo)."""
from __future__ import annotations

import click

from ..cluster import make_pool
from ..options import noise_flags, noise_options, verbose_option
from ..runtime.errors import BadInput
from . import models as zoo
from .build import MissingWeights, build_model, export_model
from .offline_calibration import calibrate_on_images, image_files
from .parallel_calibration import calibrate_in_parallel


@click.command("convert")
@click.option("--model", "model_name", required=True, help="Registered model name (see `edge-cbn models`).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="Published weight file: torchvision/lukemelas .pth or Darknet .weights. "
                   "Default: the file a package ships (efficientnet_lite0 only).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Output .tflite; the refold sidecar is written beside it as .cbn.npz.")
@click.option("--input-size", type=click.IntRange(1), help="Square input side in pixels (default: the model's).")
@click.option("--num-classes", type=click.IntRange(1), help="Number of classes (default: the model's).")
@click.option("--random-weights", is_flag=True, help="Export with random weights (for tests and benchmarks).")
@click.option("--calibrate", "calib_dir", type=click.Path(exists=True, file_okay=False),
              help="Re-estimate BN statistics offline (paper Algorithm 1) on the images in this folder before "
                   "exporting, under the noise given by --noise/--eta/--seed.")
@noise_flags(noise_help="Noise preset simulated during --calibrate (see docs/NOISE.md).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Calibration batch size.")
@click.option("--micro-batch", type=click.IntRange(1), metavar="N",
              help="Run each calibration batch N images at a time, for batches that do not fit in memory: exact "
                   "(the same statistics as the whole batch at once) but one pass per BN layer, so slow.")
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.999, show_default=True,
              help="EMA momentum m of Algorithm 1 (estimator ema).")
@click.option("--estimator", type=click.Choice(["ema", "cumulative"]), default="cumulative", show_default=True,
              help="ema: Algorithm 1 from the source statistics; cumulative: equal-weight average of all "
                   "batches (torch update_bn / AIMET). With few images EMA 0.999 barely moves.")
@click.option("--max-images", type=click.IntRange(1), help="Use at most this many calibration images.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="--calibrate in N local worker processes (whole batches each, merged in batch order: the "
                   "statistics of one process).")
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="--calibrate on a Ray cluster (pip install 'edge-cbn[cluster]'); the images at the same paths "
                   "on every node.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@verbose_option()
def main(model_name, weights, out, input_size, num_classes, random_weights, calib_dir, noise, eta, seed,
         noise_option, batch_size, micro_batch, momentum, estimator, max_images, workers, ray_address, quiet):
    """Build MODEL, load its weights, optionally calibrate BN statistics offline under simulated noise,
    fold every BatchNorm and export a float32 TFLite model plus the sidecar and calibration variant
    that on-device refolding needs."""
    if not out.endswith(".tflite"):
        raise click.BadParameter("the output must end in .tflite", param_hint="-o")
    options = noise_options(noise, noise_option)
    try:
        spec, model = build_model(model_name, weights, input_size=input_size, num_classes=num_classes,
                                  allow_random=random_weights, quiet=quiet)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--model") from None
    except MissingWeights as e:
        raise click.UsageError(str(e)) from None
    except (BadInput, ValueError, OSError) as e:  # a weight file that cannot be used or does not fit: one line
        raise click.ClickException(str(e)) from None
    if calib_dir:
        calibrate(spec, model, calib_dir, quiet=quiet, noise=noise, eta=eta, seed=seed, batch_size=batch_size,
                  micro_batch=micro_batch, momentum=momentum, estimator=estimator, max_images=max_images,
                  noise_options=options, workers=workers, ray_address=ray_address)
    path = export_model(spec, model, out, quiet=quiet)
    if not quiet:
        click.echo(f"wrote {path} and {path.with_suffix('.cbn.npz').name}", err=True)


def calibrate(spec, model, calib_dir, *, quiet, max_images, workers=None, ray_address=None, **settings) -> None:
    """Algorithm 1 on the folder's images with a progress bar, in this process or on workers
    (`parallel_calibration`); problems as one line."""
    try:
        files = image_files(calib_dir, max_images)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--calibrate") from None
    label = (f"calibrating BN ({settings['estimator']}, noise {settings['noise']} eta={settings['eta']} "
             f"seed {settings['seed']}, batch {settings['batch_size']})")
    with click.progressbar(length=len(files), label=label, hidden=quiet) as bar:
        try:
            if workers or ray_address:
                calibrate_in_parallel(model, files, make_pool(workers, ray_address), preprocess=spec.preprocess,
                                      progress=bar.update, **settings)
            else:
                calibrate_on_images(spec, model, files, progress=bar.update, **settings)
        except OSError as e:
            raise click.ClickException(str(e)) from None


@click.command("models")
def models():
    """List the registered models: input size, task, parameters, weight file."""
    click.echo(f"{'name':<20} {'input':>5}  {'task':<14} {'params':>8}  published weights")
    for name in zoo.names():
        spec = zoo.get_spec(name)
        params = zoo.build(name).count_params()
        click.echo(f"{name:<20} {spec.input_size:>5}  {spec.task:<14} {params / 1e6:>7.2f}M  "
                   f"{spec.weights_file or 'none published'} ({spec.weights_format})")
