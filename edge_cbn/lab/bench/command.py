"""`edge-cbn bench …`: benchmark commands.  Each prints a table of figures measured side by side in one
run on this machine and ends with one JSON line of them; docs/BENCHMARKS.md records results."""
from __future__ import annotations

import copy
import sys
import tempfile
import time

import click
import numpy as np

from ...convert import models as zoo
from ...options import model_option, noise_flags, num_threads_option, verbose_option
from ...runtime.interpreter import available_cpus, make_interpreter
from .calibrate import bench_calibrate as measure
from .converge import run
from .refold import refold_figures
from .soak import print_soak, soak
from .stream import StreamBench
from .sweep import TABLES, print_summary, run_bench
from .timing import emit, invoke_fn, random_model, time_per_call


@click.group()
@verbose_option()
def bench():
    """Benchmarks: models (Keras vs TFLite), refold (new statistics into the model vs reconversion), stream (FPS)."""


@bench.command("models")
@click.option("--models", "names", default="", help="Comma-separated model names (default: all).")
@num_threads_option(default=2)
@click.option("--input-size", type=click.IntRange(1), help="Override every model's input size (default: each model's "
              "own).")
def bench_models(names, num_threads, input_size):
    """Per model: Keras ms/frame, TFLite (LiteRT) ms/frame and TFLiteConverter seconds, batch size 1,
    random weights (timings do not depend on the weight values)."""
    from ...convert.export import convert_keras  # lazy: TensorFlow, only for `bench models`
    from ...convert.keras_fold import fold_model  # lazy: TensorFlow, only for `bench models`

    rows = {}
    click.echo(f"{'model':<20} {'input':>5} {'keras ms':>9} {'tflite ms':>9} {'convert s':>9}")
    for name in [n for n in names.split(",") if n] or zoo.names():
        model = random_model(name, input_size)
        side = model.input_shape[1]
        x = np.random.default_rng(0).normal(size=(1, side, side, 3)).astype(np.float32)
        keras_s = time_per_call(lambda: model(x, training=False))
        t = time.perf_counter()
        content = convert_keras(fold_model(model))
        convert_s = time.perf_counter() - t
        tflite_s = time_per_call(invoke_fn(make_interpreter(model_content=content, num_threads=num_threads), x))
        rows[name] = {"input": side, "keras_ms": round(keras_s * 1e3, 2), "tflite_ms": round(tflite_s * 1e3, 2),
                      "convert_s": round(convert_s, 2)}
        r = rows[name]
        click.echo(f"{name:<20} {side:>5} {r['keras_ms']:>9.2f} {r['tflite_ms']:>9.2f} {r['convert_s']:>9.2f}")
    emit({"bench": "models", "num_threads": num_threads, "models": rows})


@bench.command("stream")
@model_option()
@num_threads_option(default=available_cpus())
@click.option("--frames", type=click.IntRange(4), default=300, show_default=True, help="Frames per stream "
              "measurement.")
@noise_flags(default="relative", seed=False, noise_option=False, noise_help="Noise preset of the noisy runs.")
@click.option("--rounds", type=click.IntRange(1), default=9, show_default=True,
              help="Alternations of the bare invoke and the clean stream; the ratio is their median.")
@click.option("--memory-frames", type=click.IntRange(0), default=1000, show_default=True,
              help="Frames of each peak-RSS run: the stream per configuration (clean, noisy, calibrating, with "
                   "agreement sampling), each in a fresh process (device/README.md); 0: skip them.")
@click.option("--camera-fps", type=click.FloatRange(0), default=30.0, show_default=True,
              help="The camera-rate rows: the warm-up with the clip delivered at this rate, as a camera "
                   "delivers frames, against the noisy stream at the same rate; 0: skip them.")
def bench_stream(model, num_threads, frames, noise, eta, rounds, memory_frames, camera_fps):
    """Frames per second of `edge-cbn stream` on the bundled sample clip (headless with no outputs, so no
    overlay is drawn; no agreement passes), measured in one run on one model and thread count: raw LiteRT
    invoke, the clean stream, the noisy stream (pooled and exact temporal noise), and calibrating over the
    warm-up and tracking after it, flat out and at a camera's rate; plus the per-frame cost of exact noise,
    the cost of one refold and the peak RSS per configuration."""
    StreamBench(model, num_threads, frames, noise, eta, rounds, camera_fps or None).run(memory_frames)


@bench.command("converge", context_settings={"ignore_unknown_options": True})
@model_option()
@click.option("--frames", type=click.IntRange(600), default=3000, show_default=True, help="Frames per stream.")
@click.option("--agreement-every", type=click.IntRange(1), default=2, show_default=True, metavar="N",
              help="Agreement sampled on every N-th frame (the curve's resolution; 1 is the finest and slowest).")
@click.option("--noise", "presets", default="relative:0.05,paper:0.3,additive-max:0.02", show_default=True,
              metavar="PRESET:ETA,…", help="Noise settings, one stream each (the README table's by default).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run each stream again pinned to one core beside a CPU-bound process, and compare.")
@click.argument("stream_args", nargs=-1, type=click.UNPROCESSED)
def bench_converge(model, frames, agreement_every, presets, check, stream_args):
    """Time to calibrated on the bundled clip, per noise setting: frames and seconds to 50 %, 67 % and 90 % of
    the converged recovery, the agreement at frames 300 / 600 / 1000 / 3000, the frame at which the warm-up
    ended, fps, and whether the same command gives the same predictions and summary when it runs on one
    busy core.  STREAM_ARGS after `--` go to every stream (another schedule, `--video` held-out frames):

    \b
    edge-cbn bench converge
    edge-cbn bench converge --frames 1000 --no-check -- --calibrate-every 8 --stages 16"""
    try:
        settings = [(p, float(e)) for p, _, e in (item.partition(":") for item in presets.split(","))]
    except ValueError:
        raise click.BadParameter(f"{presets!r}: expected PRESET:ETA[,PRESET:ETA…]", param_hint="--noise") from None
    run(frames, agreement_every, settings, model, check, list(stream_args))


@bench.command("soak", context_settings={"ignore_unknown_options": True})
@click.option("--frames", type=click.IntRange(1), default=100000, show_default=True, help="Frames of the stream.")
@click.option("--every", type=click.IntRange(1), default=1000, show_default=True, help="Frames between RSS samples.")
@click.option("--warmup", type=click.IntRange(0), default=None, metavar="N",
              help="Frames before the growth is measured (default: a fifth of --frames).")
@click.argument("stream_args", nargs=-1, type=click.UNPROCESSED)
def bench_soak(frames, every, warmup, stream_args):
    """Resident memory of a long `edge-cbn stream` (headless, the sample clip looped unless STREAM_ARGS
    say otherwise), sampled every --every frames, and its growth after the warm-up.  STREAM_ARGS go to
    the stream after `--`, default `--noise relative --eta 0.05` (docs/RELIABILITY.md):

    \b
    edge-cbn bench soak --frames 100000 -- --noise relative --eta 0.05"""
    args = list(stream_args) or ["--noise", "relative", "--eta", "0.05"]
    print_soak(soak(args, frames, every, frames // 5 if warmup is None else warmup))


@bench.command("refold")
@click.option("--models", "names", default="efficientnet_lite0,resnet50", show_default=True,
              help="Comma-separated model names (random weights).")
@num_threads_option(default=available_cpus())
def bench_refold(names, num_threads):
    """New BN statistics into a model, per model: on-device refold (Refolder.refold into the flatbuffer's
    buffers, no TensorFlow) against reconversion (statistics set in Keras, fold_model + TFLiteConverter).
    Both produce model bytes; building an interpreter from them (XNNPACK packs the weights) costs the
    same after either and is reported beside them, with one invoke for scale."""
    rows = {}
    click.echo(f"{'model':<20} {'refold ms':>10} {'reconvert s':>12} {'ratio':>8} {'build ms':>9} {'invoke ms':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in names.split(",") if n]:
            r = rows[name] = refold_figures(name, tmp, num_threads)
            click.echo(f"{name:<20} {r['refold_ms']:>10.2f} {r['reconvert_s']:>12.2f} {r['ratio']:>7.1f}x "
                       f"{r['build_ms']:>9.1f} {r['invoke_ms']:>10.2f}")
    emit({"bench": "refold", "num_threads": num_threads, "models": rows})


bench.add_command(copy.copy(bench_refold), "refuse")  # its name before "refold" was the one word for it
bench.commands["refuse"].hidden = True


@bench.command("calibrate")
@click.option("--models", "names", default="mobilenet_v2,resnet50", show_default=True,
              help="Comma-separated model names (random weights; the speed does not depend on them).")
@click.option("--images", type=click.IntRange(2), default=256, show_default=True,
              help="Calibration images (crops of the bundled photos, written as JPEGs for both sides).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--large-batch", type=click.IntRange(0), default=256, show_default=True,
              help="Also run edge-cbn at this batch size, for its peak RSS (0: skip).")
@num_threads_option(default=2)
@noise_flags(default="relative", seed=False, noise_option=False, noise_help="Noise preset of edge-cbn's runs "
             "(torch's update_bn runs clean, as it has no noise).")
@click.option("--torch-python", default=sys.executable, show_default="this Python",
              help="The Python that runs the torch side (needs torch and torchvision).")
def bench_calibrate(names, images, batch_size, large_batch, num_threads, noise, eta, torch_python):
    """Offline calibration (Algorithm 1) per model against torch's update_bn on the torchvision model of
    the same architecture: the same images, threads and batch size; steady-state images/s, their ratio,
    and peak RSS at --batch-size and --large-batch.  Each run is a fresh process."""
    result = measure([n for n in names.split(",") if n], images, batch_size, large_batch, num_threads, noise, eta,
                     torch_python, echo=lambda msg: click.echo(msg, err=True))
    click.echo(f"{'model':<16} {'edge-cbn img/s':>14} {'torch img/s':>12} {'ratio':>6} "
               f"{'RSS MB @' + str(batch_size):>12} {'RSS MB @' + str(large_batch):>12}")
    for name, row in result["models"].items():
        ours, theirs, large = row["edge_cbn"], row["torch"], row.get("edge_cbn_large") or {}
        click.echo(f"{name:<16} {ours.get('images_per_s') or '-':>14} "
                   f"{theirs.get('images_per_s') or 'skipped':>12} {row['ratio'] or '-':>6} "
                   f"{ours.get('peak_rss_mb') or '-':>12} {large.get('peak_rss_mb') or '-':>12}")
    emit(result)


@bench.command("sweep")
@model_option("Registered name or exported .tflite of the timed sweep (default: efficientnet_lite0).")
@click.option("--images", type=click.IntRange(10), default=800, show_default=True,
              help="Evaluation images of the synthetic ImageNet-style folder (JPEG crops of the bundled photos).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Chip seeds of the sweep.")
@click.option("--noise", default="paper:0.05,0.1", show_default=True, help="PRESET:ETA[,ETA…] of the sweep.")
@click.option("--cal-frames", type=click.IntRange(1), default=64, show_default=True)
@click.option("--shard-size", type=click.IntRange(1), default=50, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True,
              help="Runs of each configuration, in alternating order; the best of each is compared.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Time an existing Ray cluster instead of starting a local two-node one.")
@click.option("--project", default="table1,table2", show_default=True,
              help="The paper's sweeps to project from per-image costs of their models ('' to skip).")
def bench_sweep(model, images, seeds, noise, cal_frames, shard_size, rounds, ray_address, project):
    """The same `evaluate classification` sweep with 1 and 2 local workers (LiteRT at 1 thread each) and on a
    two-node local Ray cluster (1 CPU a node), side by side, each a fresh process: wall times, speedups,
    per-image costs; then per-image costs of the paper's models and the projected CPU-hours and wall time
    of its Table 1 and Table 2 sweeps (docs/BENCHMARKS.md)."""
    tables = [t for t in project.split(",") if t]
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise click.BadParameter(f"{unknown}: expected some of {sorted(TABLES)}", param_hint="--project")
    echo = lambda msg: click.echo(msg, err=True)  # noqa: E731
    figures = run_bench(model or "efficientnet_lite0", images=images, seeds=seeds, noise=noise, cal_frames=cal_frames,
                        shard_size=shard_size, rounds=rounds, ray_address=ray_address, project=tables, echo=echo)
    print_summary(figures, click.echo)
    emit(figures)
