"""`tools/convert.py` / `edge-cbn convert` (build, load the published weights, optionally calibrate
offline, fold and export) and `edge-cbn models` (the zoo)."""
from __future__ import annotations

import click

from pathlib import Path

from ..cluster import make_pool
from ..options import noise_flags, noise_options, verbose_option
from ..runtime.errors import BadInput
from ..runtime.validation import TASKS
from . import models as zoo
from .build import MissingWeights, build_model, export_model, say
from .offline_calibration import calibrate_on_images, image_files
from .parallel_calibration import calibrate_in_parallel


def own_model_flags(fn):
    """The flags that say what a model of your own needs, where the model does not say it itself."""
    flags = [
        click.option("--keras", "keras_file", type=click.Path(exists=True),
                     help="Your own Keras model: a .keras or .h5 file (instead of --model; README 'Your own model')."),
        click.option("--task", type=click.Choice(TASKS),
                     help="Your own model's task. Default: classification for one (N, classes) output, segmentation "
                          "for per-pixel classes at the input size, else raw (agreement = cosine similarity)."),
        click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False),
                     help="Class names, one a line (default: 'class 0', 'class 1', ...)."),
        click.option("--head", "head_file", type=click.Path(exists=True, dir_okay=False),
                     help="A detector's YOLO head spec, JSON {anchors, masks, strides} (docs/DESIGN.md)."),
        click.option("--mean", metavar="R,G,B",
                     help="Input normalisation (rgb - mean) / std in pixel units (0..255): one value or three, "
                          "comma-separated, e.g. 123.7,116.3,103.5."),
        click.option("--std", metavar="R,G,B", help="See --mean, e.g. 58.4,57.1,57.4."),
        click.option("--input-range", type=(float, float), metavar="LOW HIGH",
                     help="The range the model wants pixels in, e.g. 0 1 or -1 1 (instead of --mean/--std). Default: "
                          "the model's own Rescaling/Normalization layers, fed pixels 0..255."),
        click.option("--noise-layers", metavar="PATTERN",
                     help="The layers noise acts on: comma-separated shell patterns matched against layer names, kinds "
                          "(conv, depthwise, dense, transpose) and Keras classes. Default: every conv and dense kernel."),
    ]
    for flag in reversed(flags):
        fn = flag(fn)
    return fn


@click.command("convert")
@click.option("--model", "model_name",
              help="Registered model name (see `edge-cbn models`), or keras.applications.NAME (e.g. "
                   "keras.applications.MobileNetV2) with --weights FILE or --random-weights.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="Published weight file: torchvision/lukemelas .pth, Darknet .weights, or the .h5 file Keras "
                   "publishes for a keras.applications model. Default: the file a package ships (efficientnet_lite0 only).")
@own_model_flags
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
@click.option("--no-sweep", "no_sweep", is_flag=True,
              help="Write no sweep variant (X.sweep.tflite): the export converts two models instead of three, and "
                   "the stream calibrates the model depth first, one BN layer per calibration frame.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@verbose_option()
def main(model_name, weights, keras_file, task, labels_file, head_file, mean, std, input_range, noise_layers, out,
         input_size, num_classes, random_weights, calib_dir, noise, eta, seed, noise_option, batch_size, micro_batch,
         momentum, estimator, max_images, workers, ray_address, no_sweep, quiet):
    """Build MODEL (or load your own --keras FILE), load its weights, optionally calibrate BN statistics
    offline under simulated noise, fold every BatchNorm and export a float32 TFLite model plus the sidecar
    and calibration variant that on-device refolding needs."""
    if not out.endswith(".tflite"):
        raise click.BadParameter("the output must end in .tflite", param_hint="-o")
    if bool(model_name) == bool(keras_file):
        raise click.UsageError("give the model: --model NAME (a registered one or keras.applications.NAME) or "
                               "--keras FILE")
    from . import own_model  # lazy: Keras, once a conversion runs (not for --help)

    options = noise_options(noise, noise_option)
    own = dict(task=task, labels_file=labels_file, head_file=head_file, mean=mean, std=std,
               input_range=input_range)
    try:
        own_source = bool(keras_file) or model_name.startswith(own_model.APPLICATIONS_PREFIX)
        if own_source:
            spec, model = own_model_source(model_name, keras_file, weights, input_size, num_classes, random_weights,
                                           quiet=quiet, **own)
        else:
            spec, model = registered_source(model_name, weights, input_size, num_classes, random_weights, quiet=quiet,
                                            **own)
        chosen = own_model.select_noise_layers(model, noise_layers)
    except (BadInput, ValueError, OSError) as e:  # a model or weight file that cannot be used: one line
        raise click.ClickException(str(e)) from None
    if calib_dir:
        calibrate(spec, model, calib_dir, quiet=quiet, noise=noise, eta=eta, seed=seed, batch_size=batch_size,
                  micro_batch=micro_batch, momentum=momentum, estimator=estimator, max_images=max_images,
                  noise_options=options, workers=workers, ray_address=ray_address, noise_layers=chosen)
    try:
        path = export_model(spec, model, out, quiet=quiet, noise_layers=chosen, input_as_conv=own_source,
                            sweep=not no_sweep)
    except ValueError as e:  # FoldError, GraphError, ExportError: a layer edge-cbn or LiteRT cannot export
        raise click.ClickException(str(e)) from None
    if not quiet:
        click.echo(f"wrote {path} and {path.with_suffix('.cbn.npz').name}", err=True)


def registered_source(name, weights, input_size, num_classes, random_weights, *, quiet, **own):
    """(spec, model) of a registered model; the own-model flags do not apply to it."""
    given = [f"--{k.replace('_file', '').replace('_', '-')}" for k, v in own.items() if v]
    if given:
        raise click.UsageError(f"{', '.join(given)}: for --keras FILE and keras.applications models; a registered "
                               "model's task, labels and preprocessing are its own")
    try:
        return build_model(name, weights, input_size=input_size, num_classes=num_classes, allow_random=random_weights,
                           quiet=quiet)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--model") from None
    except MissingWeights as e:
        raise click.UsageError(str(e)) from None


def own_model_source(name, keras_file, weights, input_size, num_classes, random_weights, *, quiet, **own):
    """(spec, flat model) of a Keras file or a keras.applications model, with what using it needs read from
    the model and the flags (`own_model.describe`); each finding said on stderr."""
    from . import own_model  # lazy: Keras

    if keras_file:
        if weights or random_weights or num_classes:
            raise click.UsageError("--weights, --random-weights and --num-classes: for --model; a --keras file "
                                   "holds its own weights and classes")
        say(f"loading {keras_file}", quiet)
        model, known, name = own_model.load_keras_file(keras_file), None, Path(keras_file).stem
    else:
        say(f"building {name}" + (f" with weights from {weights}" if weights else " with random weights"), quiet)
        model, known = own_model.keras_application(name, weights=weights, random_weights=random_weights,
                                                    input_size=input_size, num_classes=num_classes)
        name = name[len(own_model.APPLICATIONS_PREFIX):]
    described = own_model.describe(model, name=name, preprocess=known, input_size=input_size, **own)
    for note in described.notes:
        say(note, quiet)
    return own_model.spec_of(described), described.model


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
@click.option("--keras", "keras_file", type=click.Path(exists=True),
              help="List what your own Keras model holds instead: input, preprocessing, task, labels, every "
                   "BatchNorm (folded, or kept as an affine) and the noise targets.")
@click.option("--input-size", type=click.IntRange(1), help="With --keras: the input side, for a model whose size is free.")
@click.option("--task", type=click.Choice(TASKS), help="With --keras: the task, as `convert --task`.")
@click.option("--noise-layers", metavar="PATTERN", help="With --keras: the noise targets, as `convert --noise-layers`.")
def models(keras_file, input_size, task, noise_layers):
    """List the registered models: input size, task, parameters, weight file (or, with --keras FILE, what
    your own model holds)."""
    if keras_file:
        from . import own_model  # lazy: Keras

        try:
            own = own_model.describe(own_model.load_keras_file(keras_file), name=Path(keras_file).stem,
                                     input_size=input_size, task=task, need_preprocess=False)
            click.echo("\n".join(own_model.report(own, own_model.select_noise_layers(own.model, noise_layers))))
        except (BadInput, ValueError, OSError) as e:
            raise click.ClickException(str(e)) from None
        return
    if input_size or task or noise_layers:
        raise click.UsageError("--input-size, --task and --noise-layers: with --keras FILE")
    click.echo(f"{'name':<20} {'input':>5}  {'task':<14} {'params':>8}  published weights")
    for name in zoo.names():
        spec = zoo.get_spec(name)
        params = zoo.build(name).count_params()
        click.echo(f"{name:<20} {spec.input_size:>5}  {spec.task:<14} {params / 1e6:>7.2f}M  "
                   f"{spec.weights_file or 'none published'} ({spec.weights_format})")
    click.echo("\nand any keras.applications model with its published .h5 file, or your own: "
               "convert --model keras.applications.NAME | --keras FILE")
