"""`edge-cbn stream`: the device app's command.  Its flags fill `StreamOptions` by name; the engine and
the loop do the work."""
from __future__ import annotations

import json
import os
import threading

import click

from ..options import (max_image_pixels_option, model_option, noise_flags, noise_options, num_threads_option,
                       noise_states_option, refold_every_option, verbose_option)
from ..runtime.interpreter import CPU_DELEGATE, DELEGATE_LIBRARIES, available_cpus
from ..runtime.memory import return_freed_memory
from ..runtime.stream_calibrator import MODES
from .engine import Engine
from .loop import StreamLoop, stop_on_signals
from .options import DEPTH_EVERY, SWEEP_EVERY, TRACKING_EVERY, Cadence, StreamOptions, warn
from .resolve import load_model, open_frames

NOISE_STATES_HELP = ("Temporal noise: K pre-drawn noise states cycled per frame (a seeded pick each frame): no "
                     "per-frame cost, but frames see only K variants, rebuilt at each refold (a refold costs K "
                     "interpreter builds). 0 = exact: every frame draws its own noise and builds its "
                     "interpreter (faithful but slow: the build costs more than the invoke).")
CALIBRATE_EVERY_HELP = (
    f"Calibrate on every N-th frame through the warm-up (default {SWEEP_EVERY} with the sweep, {DEPTH_EVERY} "
    f"without); then with the sweep on every N-th until {Cadence.of(1, True).converged_warmups} times its calibration "
    f"frames are in, without it on every {Cadence.of(1, False).second_every}N-th until "
    f"{Cadence.of(1, False).converged_warmups} times; then on every {TRACKING_EVERY}th. "
    "Calibration runs beside serving, on a core of its own, and what it finds serves 8 frames later (waiting "
    "for it if need be), so the result is a function of the frames: the same on any machine and under any load; "
    "a slower or busier machine only runs at a lower frame rate.")
AGREEMENT_HELP = ("With noise: every N-th frame (frames N-1, 2N-1, ...) also run the clean model and the uncalibrated "
                  "noisy model (only on those sampled frames) and report the served prediction's agreement with the "
                  "clean one, before and after calibration. 0: off (saves the memory of those two models).")
DELEGATE_HELP = (
    "Where serving runs: xnnpack (LiteRT's CPU default, with --num-threads), gpu "
    f"({DELEGATE_LIBRARIES['gpu']['Linux']}), edgetpu ({DELEGATE_LIBRARIES['edgetpu']['Linux']}), the path of a "
    "LiteRT delegate library, or auto (edgetpu, then gpu, else xnnpack with a notice). Calibration, the clean "
    "model and agreement sampling stay on the CPU.")
D = StreamOptions  # the defaults


def delegate_options(spec: str, items) -> dict:
    """`--delegate-option KEY=VALUE` items -> the delegate's options.

    Args:
        spec: the --delegate value.
        items: the KEY=VALUE strings.

    Returns:
        {key: value}, both strings (LiteRT's `load_delegate` takes strings).

    Raises:
        click.BadParameter: an item that is not KEY=VALUE, or options for xnnpack (built in: nothing takes them).
    """
    if items and spec == CPU_DELEGATE:
        raise click.BadParameter(f"--delegate {CPU_DELEGATE} is built into LiteRT and takes no options",
                                 param_hint="--delegate-option")
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--delegate-option")
        options[key.strip()] = value
    return options


def _budget_gone() -> None:
    """An old service file's --calibration-budget: a notice, and the stream runs."""
    warn("--calibration-budget is gone: calibration is paced by frame index (--calibrate-every), so the result "
         "no longer depends on the machine; the flag is ignored")


@click.command("stream")
@click.option("--camera", help="Camera index or device path (e.g. 0 or /dev/video2); a stream URL works as with "
              "--video.")
# click.Path leaves the value as typed (no resolve_path): a URL reaches `open_source` unchanged.
@click.option("--video", type=click.Path(dir_okay=False),
              help="Video file, or a network stream URL: rtsp://, rtsps://, http(s):// (MJPEG, HLS .m3u8); a "
                   "stream reconnects when it drops, its outages counted in skipped_frames.")
@click.option("--images", type=click.Path(file_okay=False), help="Folder of images (sorted by name).")
@click.option("--loop", is_flag=True, help="Start the video/image folder again at its end (the bundled sample "
              "clip used without a source always loops).")
@click.option("--width", type=int, default=640, show_default=True, help="Camera capture width.")
@click.option("--height", type=int, default=480, show_default=True, help="Camera capture height.")
@click.option("--picamera2", is_flag=True, help="Camera 0 through picamera2 (Raspberry Pi camera modules) "
              "instead of OpenCV/V4L2.")
@model_option("Registered name or exported FILE.tflite (with FILE.cbn.npz, FILE.calib.tflite and FILE.sweep.tflite "
              "beside it). "
              "Default: efficientnet_lite0 (converted once on first use; needs TensorFlow).")
@num_threads_option()
@click.option("--delegate", default=D.delegate, show_default=True, metavar="NAME|LIBRARY", help=DELEGATE_HELP)
@click.option("--delegate-option", "delegate_option", multiple=True, metavar="KEY=VALUE",
              help="An option of the --delegate library, repeatable (e.g. device=usb for the Edge TPU).")
@click.option("--max-results", type=click.IntRange(0), default=D.max_results, show_default=True,
              help="Classification: classes shown.")
@click.option("--score-threshold", type=float, default=D.score_threshold, show_default=True,
              help="Detection: min score.")
@noise_flags()
@noise_states_option(D.noise_states, NOISE_STATES_HELP, old="--noise-pool")
@click.option("--calibrate/--no-calibrate", default=None,
              help="Re-estimate BN statistics on the stream (default: when --noise is not none).")
@click.option("--mode", type=click.Choice(MODES), default=D.mode, show_default=True,
              help="shift: correct only the noise-induced change (runs the clean variant too on calibration "
                   "frames); absolute: the paper's re-estimation; prior: blend with the source statistics.")
@click.option("--window", type=click.FloatRange(1), default=D.window, show_default=True, metavar="N",
              help="Moments window: a cumulative average over the first N calibration frames, then an EMA over "
                   "about N frames, which follows drift (docs/RESULTS.md: shorter windows lost accuracy on "
                   "natural-photo crops).")
@refold_every_option(D.refold_every,
                     help="Depth-first warm-up (--no-sweep): calibration frames per stage (a refold ends each stage).")
@click.option("--stages", type=click.IntRange(1), default=D.stages, show_default=True,
              help="Depth-first warm-up (--no-sweep): the BN layers in this many consecutive groups, calibrated in "
                   "turn (capped at the number of BN layers: one layer per stage, what works; several layers per "
                   "stage degrade the estimate, docs/RESULTS.md).")
@click.option("--track-every", type=click.IntRange(1), default=D.track_every, show_default=True,
              help="After the warm-up: refold every N calibration frames (tracks drift).")
@click.option("--sweep/--no-sweep", default=None,
              help="Calibrate every BN layer from each calibration frame, depth first inside one invoke of the sweep "
                   "variant (FILE.sweep.tflite; default when the model has one and --mode is shift). --no-sweep: "
                   "one BN layer per calibration frame (--stages).")
@click.option("--warmup-frames", type=click.IntRange(1), default=D.warmup_frames, show_default=True, metavar="N",
              help="Sweep: calibration frames of the warm-up.")
@click.option("--calibrate-every", type=click.IntRange(1), default=None, metavar="N",
              help=CALIBRATE_EVERY_HELP)
@click.option("--calibration-budget", hidden=True, expose_value=False, callback=lambda ctx, param, value: value and
              _budget_gone())
@click.option("--state", type=click.Path(),
              help="Save the calibration state to FILE (.npz) and the last good calibrated model beside it "
                   "(FILE-stem.calibrated.tflite + .cbn.npz), atomically; resume from them on start.")
@click.option("--save-interval", type=click.FloatRange(0), default=D.save_interval, show_default=True,
              metavar="SECONDS", help="Save after a refold at most every SECONDS (0: after every refold); always "
                                      "at exit.")
@click.option("--agreement-every", type=click.IntRange(0), default=D.agreement_every, show_default=True, metavar="N",
              help=AGREEMENT_HELP)
@click.option("--frames", type=click.IntRange(1), help="Stop after N frames.")
@click.option("--headless", is_flag=True, help="No window (automatic without DISPLAY/WAYLAND_DISPLAY).")
@click.option("--record", type=click.Path(dir_okay=False), help="Write the annotated frames to an .mp4.")
@click.option("--serve", type=int, metavar="PORT", help="Browser preview (MJPEG + /status JSON) on PORT.")
@click.option("--host", default=D.host, show_default=True, help="Preview address (0.0.0.0: all).")
@click.option("--log", type=click.Path(dir_okay=False), help="JSON lines: one per frame, then {\"summary\": ...}.")
@click.option("--quiet", is_flag=True, help="No progress lines (warnings, errors and the summary only).")
@max_image_pixels_option()
@verbose_option()
def main(**params):
    """Live inference on a camera, a video file or stream URL, or an image folder (default: the bundled
    sample clip) under simulated analog weight noise, with Calibrated BatchNorm re-estimated on the device
    at batch size 1.

    \b
    edge-cbn stream                                   sample clip, clean model, window or headless
    edge-cbn stream --noise relative --eta 0.05       noisy chip, calibrating as it streams
    edge-cbn stream --camera 0 --serve 8080 --state /var/lib/edge-cbn/state.npz
    Ctrl-C or SIGTERM stop cleanly (state saved); 'q' in the window too.
    """
    return_freed_memory()  # the stream runs for weeks and refolds often: keep its peak near what it holds
    has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    opts = StreamOptions.from_params(
        params, num_threads=params["num_threads"] or available_cpus(), headless=params["headless"] or not has_display,
        noise_options=noise_options(params["noise"], params["noise_option"]),
        delegate_options=delegate_options(params["delegate"], params["delegate_option"]))
    quiet = opts.quiet
    echo = (lambda *a, **k: None) if quiet else (lambda msg, **k: click.echo(msg, err=True))
    source = open_frames(*(params[k] for k in ("camera", "video", "images", "loop", "width", "height", "picamera2")))
    stop = threading.Event()
    try:
        with stop_on_signals(stop, source):  # a SIGTERM while the models load stops before the first frame
            bundle, name = load_model(params["model"])
            summary = StreamLoop(Engine(bundle, opts, echo=echo), source, opts, model_name=name, stop=stop).run()
    finally:
        source.close()
    if not quiet:
        before, after = summary["agreement_before"], summary["agreement_after"]
        agree = (f"  agreement ({summary['agreement_metric']}) {before}% -> {after}%"
                 if before is not None else "")
        click.echo(f"{summary['frames']} frames at {summary['fps']} fps, {summary['refolds']} refolds{agree}",
                   err=True)
    click.echo(json.dumps({"summary": summary}))
