"""`edge-cbn stream`: live inference on a camera, video or image folder under simulated analog weight
noise, with Calibrated BatchNorm re-estimated on the device at batch size 1 while it streams.

One loop, like the TFLite Raspberry Pi examples (classify.py / detect.py) plus calibration:

    capture -> preprocess -> noisy invoke -> calibrator update -> re-fuse when due -> overlay
            -> show / serve / record / log

`Engine` is the model side of one frame (`Engine.process`), `StreamLoop` drives a source through it into
the outputs; `edge-cbn bench stream` runs the same two classes with other flags.  Device side: numpy,
OpenCV and LiteRT only (never TensorFlow or a workstation module).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click
import cv2
import numpy as np

from . import overlay
from .bundle import load_bundle
from .calibrator import DEFAULTS as CAL_DEFAULTS, MODES, StreamCalibrator
from .cli import noise_options as cli_noise_options
from .detection import box_iou
from .engine import NoisyModel, noise_layers
from .noise import PRESETS, make_noise
from .runtime import Processor, io_indices, make_interpreter, run_interpreter
from .sources import Prefetched, SourceError, open_source
from .state import Saver, Snapshot, StateStore, fingerprint
from .worker import LatestJobWorker

MAX_SAMPLES = 10000
AGREEMENT_METRICS = {"classification": "top1_agreement", "detection": "box_f1_iou50",
                     "segmentation": "pixel_agreement"}


# Re-fuses of the calibration variant between updates of the serving model (a pool of interpreters to
# rebuild); calibration frames already serve with the newest statistics.
SERVE_REFUSE_EVERY = 16
# Once CONVERGED_FRAMES calibration frames are in (the estimate has mostly converged by then,
# docs/RESULTS.md), calibration takes TRACKING_SLOWDOWN times less: the statistics only drift.
CONVERGED_FRAMES = 192
TRACKING_SLOWDOWN = 4


@dataclasses.dataclass
class StreamOptions:
    """Everything `edge-cbn stream` can be told (defaults = the command's defaults)."""
    num_threads: int | None = None
    max_results: int = 3
    score_threshold: float = 0.25
    noise: str = "none"
    eta: float = 0.05
    seed: int = 0
    noise_options: dict = dataclasses.field(default_factory=dict)  # make_noise keywords (--noise-option)
    noise_pool: int = 4
    calibrate: bool | None = None  # None: when noise is on (and the model has a calibration variant)
    mode: str = CAL_DEFAULTS["mode"]
    window: float = CAL_DEFAULTS["window"]
    refuse_every: int = CAL_DEFAULTS["refuse_every"]
    stages: int = CAL_DEFAULTS["stages"]
    track_every: int = CAL_DEFAULTS["track_every"]
    calibration_budget: float = 0.2
    calibrate_every: int | None = None  # a fixed cadence instead of the time budget
    agreement_every: int = 10
    state: str | None = None
    save_interval: float = 30.0
    frames: int | None = None
    headless: bool = True
    record: str | None = None
    serve: int | None = None
    host: str = "127.0.0.1"
    log: str | None = None
    quiet: bool = False
    progress_every: float = 2.0

    @property
    def noise_on(self) -> bool:
        return self.noise != "none"


class StreamError(click.ClickException):
    """One clear line for the user (exit code 1)."""


def warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


class _PlainModel:
    """A `.tflite` without its re-fuse sidecar: clean inference only (NoisyModel's `run` interface)."""

    def __init__(self, bundle, num_threads=None):
        it = make_interpreter(model_content=bundle.model_bytes, num_threads=num_threads)
        self._io = (it, *io_indices(it))

    def run(self, x, frame):
        return run_interpreter(*self._io, x)


# ------------------------------------------------------------------------------------------ agreement
def agreement(task: str, reference, other) -> float:
    """Agreement (%) of a prediction with the clean model's on one frame: classification top-1 equality;
    detection F1 of greedy one-to-one matches (same class, IoU >= 0.5) — 100 when both find nothing;
    segmentation pixel agreement of the class masks."""
    if task == "classification":
        return 100.0 if reference[0][0] == other[0][0] else 0.0
    if task == "segmentation":
        return float(np.mean(np.asarray(reference) == np.asarray(other)) * 100)
    if not reference and not other:
        return 100.0
    free = list(other)
    matched = 0
    for cls, _, _, box in sorted(reference, key=lambda d: -d[2]):
        same = [j for j, o in enumerate(free) if o[0] == cls]
        if not same:
            continue
        ious = box_iou(np.float32(box), np.float32([free[j][3] for j in same]))
        best = int(np.argmax(ious))
        if ious[best] >= 0.5:
            matched += 1
            free.pop(same[best])
    return 200.0 * matched / (len(reference) + len(other))


def _short(task: str, pred):
    """A prediction as recorded in the log's agreement samples."""
    if task == "classification":
        return pred[0][1]
    if task == "detection":
        return len(pred)
    return sorted(int(c) for c in np.unique(pred) if c)


# ---------------------------------------------------------------------------------------------- engine
@dataclasses.dataclass
class FrameResult:
    prediction: object
    latency_ms: float
    calibrating: bool  # the calibrator ran on this frame
    refused: bool      # and asked for a re-fuse
    sample: dict | None = None  # agreement sample of this frame


class Engine:
    """The model side of the stream: serving model (under noise), calibration variants, calibrator,
    agreement models, state persistence.  `process(frame_bgr, i)` handles stream frame `i`."""

    def __init__(self, bundle, opts: StreamOptions, *, echo=None):
        self.bundle, self.opts = bundle, opts
        self.echo = echo or (lambda msg: None)
        self.proc = Processor(bundle, max_results=opts.max_results, conf_threshold=opts.score_threshold)
        self.task = self.proc.task
        if opts.noise not in PRESETS:
            raise StreamError(f"unknown noise preset {opts.noise!r} (one of {', '.join(PRESETS)})")
        if opts.noise_on and not bundle.has_sidecar:
            raise StreamError(f"--noise needs the model's re-fuse sidecar {bundle.path.stem}.cbn.npz next to "
                              f"{bundle.path.name} (written by tools/convert.py)")
        calibrate = opts.noise_on if opts.calibrate is None else opts.calibrate
        if calibrate and not bundle.can_calibrate:
            msg = (f"{bundle.path.name} has no calibration variant ({bundle.path.stem}.calib.tflite + sidecar): "
                   "re-export it with tools/convert.py")
            if opts.calibrate:
                raise StreamError(msg)
            warn(msg + "; streaming without calibration")
            calibrate = False
        for name in ("calibrate_every", "refuse_every", "stages", "track_every"):
            if getattr(opts, name) is not None and getattr(opts, name) < 1:
                raise StreamError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 < opts.calibration_budget < 1:
            raise StreamError("--calibration-budget must be between 0 and 1")
        # Time spent in process(): all of it, and the part calibration added over plain serving.
        self._elapsed_ms = self._calibration_ms = self._serve_ms = 0.0
        if opts.agreement_every < 0:
            raise StreamError("--agreement-every must be >= 0")
        if opts.noise_pool < 0:
            raise StreamError("--noise-pool must be >= 0")
        self.noise_text = overlay.noise_text(opts.noise if opts.noise_on else None, opts.eta, opts.seed)
        try:
            self.chip = (make_noise(opts.noise, opts.eta, opts.seed, **opts.noise_options)
                         .instantiate(noise_layers(bundle)) if opts.noise_on else None)
        except ValueError as e:
            raise StreamError(f"--noise-option: {e}") from None
        threads = opts.num_threads
        self.cal = self._new_calibrator() if calibrate else None

        # Saved state: what it is valid for, then try to resume.
        self.store = self.saver = None
        resumed = None
        if opts.state and bundle.has_sidecar:
            n_bns = len(bundle.meta.get("calibration", {}).get("bns", []))
            self.store = StateStore(opts.state, bundle, fingerprint(
                bundle, noise=opts.noise, eta=opts.eta if opts.noise_on else 0.0, seed=opts.seed,
                noise_options=opts.noise_options, mode=opts.mode, stages=min(opts.stages, n_bns) or 1))
            self.store.remove_stale_temporaries()
            if self.store.path.exists():
                # Without calibration the saved statistics are served frozen: mode and stages do not matter.
                resumed = self._resume(ignore=() if self.cal else ("mode", "stages"))
        elif opts.state:
            warn(f"--state ignored: {bundle.path.name} has no re-fuse sidecar")
        self.resumed = resumed is not None
        self.frame0 = int(resumed.counters.get("frames", 0)) if resumed else 0
        self.refuses = int(resumed.counters.get("refuses", 0)) if resumed else 0
        self.calibration_frames = int(resumed.counters.get("calibration_frames", 0)) if resumed else 0
        self.calibrated = self.refuses > 0  # calibrated statistics are in force

        # Serving model: the calibrated model on disk when resuming from it, else the source model.
        if not bundle.has_sidecar:
            self.serving = _PlainModel(bundle, threads)
        elif resumed and resumed.model_path is not None:
            self.serving = NoisyModel(load_bundle(resumed.model_path, require_sidecar=True), self.chip,
                                      num_threads=threads, pool=opts.noise_pool, seed=opts.seed)
            self.echo(f"resumed from {resumed.model_path} ({self.refuses} re-fuses, {self.frame0} frames)")
        else:
            self.serving = NoisyModel(bundle, self.chip, num_threads=threads, pool=opts.noise_pool, seed=opts.seed)
            if resumed:
                self.serving.set_stats(resumed.stats)
                self.echo(f"resumed from {opts.state} ({resumed.note}: re-fused the saved statistics)")
        self.variant = self.clean_variant = None
        if self.cal:
            variant = bundle.calibration_variant()
            self.variant = NoisyModel(variant, self.chip, num_threads=threads, seed=opts.seed)
            if self.cal.needs_clean:
                self.clean_variant = NoisyModel(variant, None, num_threads=threads)
            if resumed:
                self.variant.set_stats(resumed.stats)
        if self.store and self.cal:
            self.saver = Saver(self.store, on_error=lambda e: warn(f"cannot save the state to {opts.state}: {e}"))
            from .refuse import Refuser  # clean weights + calibrated statistics: the model that is saved
            self._export = Refuser(bundle)
        self._last_save = time.monotonic()
        per_frame_exact = isinstance(self.serving, NoisyModel) and self.serving.per_frame and not self.serving.pool
        # Re-fuses of the serving model run beside it when that is safe (it picks ready-made interpreters
        # per frame: pooled, static or clean): the stream keeps serving the old interpreters while the new
        # ones are built (`NoisyModel.set_stats` builds before it replaces).
        self._refuser = LatestJobWorker(self._apply, name="edge-cbn-refuse", background=not per_frame_exact)

        # Agreement: the clean model and the noisy model never re-fused, on sampled frames only.
        self.clean = self.uncalibrated = None
        if opts.noise_on and opts.agreement_every:
            self.clean = NoisyModel(bundle, None, num_threads=threads)
            self.uncalibrated = NoisyModel(bundle, self.chip, num_threads=threads, pool=opts.noise_pool,
                                           seed=opts.seed)
        # (frame, before, after) of the latest samples: bounded, the service runs for weeks.
        self.samples: collections.deque = collections.deque(maxlen=MAX_SAMPLES)

    def _resume(self, ignore=()):
        try:
            resumed = self.store.load(ignore=ignore)
            if self.cal:
                self.cal.load_state_dict(resumed.calibrator)
        except Exception as e:  # whatever is wrong with the file, never crash on it
            msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            warn(f"state {self.opts.state} not used ({msg}); starting fresh")
            if self.cal:  # undo a half-done load_state_dict
                self.cal = self._new_calibrator()
            return None
        return resumed

    def _new_calibrator(self) -> StreamCalibrator:
        o = self.opts
        return StreamCalibrator(self.bundle, mode=o.mode, window=o.window, refuse_every=o.refuse_every,
                                stages=o.stages, track_every=o.track_every)

    # ------------------------------------------------------------------------------------ calibration
    def calibration_text(self) -> str:
        if self.cal is None:
            return "calibrated (frozen)" if self.calibrated else "off"
        if not self.cal.warm:
            done = round(self.cal.progress * self.cal.warmup_frames)
            return f"warm-up {done}/{self.cal.warmup_frames} (stage {self.cal.stage + 1}/{self.cal.stages})"
        return f"calibrated, tracking ({self.refuses} re-fuses)"

    def _apply(self, job) -> None:
        """Re-fuse `stats` into the serving model (background thread when safe), then maybe save."""
        stats, snap_counters, cal_state, force = job
        if stats is not None:
            self.serving.set_stats(stats)
        if self.saver is not None and (force or time.monotonic() - self._last_save >= self.opts.save_interval):
            self._last_save = time.monotonic()
            stats = stats or self.variant.stats()
            self._export.refuse(stats)
            self.saver.submit(Snapshot(stats, cal_state, self._export.model_bytes(), snap_counters))

    def _counters(self, frames_done: int) -> dict:
        return {"frames": self.frame0 + frames_done, "refuses": self.refuses,
                "calibration_frames": self.calibration_frames,
                "progress": self.cal.progress if self.cal else None}

    def save(self, frames_done: int) -> None:
        """Save now (at exit): waits for pending re-fuses, then for the write."""
        self._refuser.wait()
        if self.saver is not None:
            self._apply((None, self._counters(frames_done), self.cal.state_dict(), True))
            self.saver.flush()

    # ------------------------------------------------------------------------------------------ frame
    @property
    def converged(self) -> bool:
        return self.cal is not None and self.cal.warm and self.calibration_frames >= CONVERGED_FRAMES

    def _calibration_due(self, i: int) -> bool:
        """Calibrate this frame?  With --calibrate-every, on a fixed cadence; otherwise whenever the time
        calibration has added stays within --calibration-budget of all frame time, so the stream keeps
        about (1 - budget) of its noisy frame rate on any board and model.  Both slow down by
        TRACKING_SLOWDOWN once the estimate has converged."""
        slowdown = TRACKING_SLOWDOWN if self.converged else 1
        if self.opts.calibrate_every:
            return i % (self.opts.calibrate_every * slowdown) == 0
        return self._calibration_ms <= self.opts.calibration_budget / slowdown * self._elapsed_ms

    def process(self, frame_bgr: np.ndarray, i: int) -> FrameResult:
        """Stream frame `i` (0-based in this run); every model of the frame uses the same noise frame
        index."""
        t = time.perf_counter()
        x, ctx = self.proc.preprocess(frame_bgr)
        fi = self.frame0 + i
        calibrating = refused = False
        if self.cal is not None and self._calibration_due(i):
            calibrating = True
            was_warm = self.cal.warm
            out = self.variant.run(x, fi)
            clean_out = self.clean_variant.run(x, fi) if self.clean_variant else None
            stats = self.cal.observe(out[-1], self.variant.stats(),
                                     None if clean_out is None else clean_out[-1],
                                     None if clean_out is None else self.clean_variant.stats())
            self.calibration_frames += 1
            outputs = out[:-1]
            if stats is not None:
                refused = True
                self.refuses += 1
                self.calibrated = True
                self.variant.set_stats(stats)
                warmed = self.cal.warm and not was_warm
                if warmed or self.refuses % SERVE_REFUSE_EVERY == 0:
                    cal_state = self.cal.state_dict() if self.saver else None
                    # The end of the warm-up is always saved, whatever --save-interval says.
                    self._refuser.submit((stats, self._counters(i + 1), cal_state, warmed))
        else:
            outputs = self.serving.run(x, fi)
        pred = self.proc.postprocess(outputs, ctx)
        latency = (time.perf_counter() - t) * 1e3
        self._elapsed_ms += latency
        if calibrating:
            self._calibration_ms += max(latency - self._serve_ms, 0.0)
        else:  # running mean of a served frame's cost
            self._serve_ms += (latency - self._serve_ms) / (min(i, 50) + 1)
        sample = None
        if self.clean is not None and (i + 1) % self.opts.agreement_every == 0:
            clean = self.proc.postprocess(self.clean.run(x, fi), ctx)
            uncal = self.proc.postprocess(self.uncalibrated.run(x, fi), ctx)
            sample = {"frame": i, "clean": _short(self.task, clean), "uncalibrated": _short(self.task, uncal),
                      "served": _short(self.task, pred), "before": round(agreement(self.task, clean, uncal), 3),
                      "after": round(agreement(self.task, clean, pred), 3)}
            self.samples.append((i, sample["before"], sample["after"]))
        return FrameResult(pred, latency, calibrating, refused, sample)

    def agreement_summary(self, frames_total: int) -> dict:
        """Mean agreement (%) over the sampled frames of the second half of the stream (at most the
        latest MAX_SAMPLES samples)."""
        late = [s for s in self.samples if s[0] >= frames_total / 2]
        out = {"agreement_metric": AGREEMENT_METRICS.get(self.task), "agreement_samples": len(late),
               "agreement_before": None, "agreement_after": None}
        if late:
            out["agreement_before"] = round(float(np.mean([s[1] for s in late])), 2)
            out["agreement_after"] = round(float(np.mean([s[2] for s in late])), 2)
        return out

    def close(self) -> None:
        self._refuser.close()
        if self.saver is not None:
            self.saver.close()


# ------------------------------------------------------------------------------------------- outputs
def describe(task: str, pred) -> str:
    if task == "classification":
        return f"{pred[0][1]} {pred[0][2]:.2f}" if pred else "-"
    if task == "detection":
        names = sorted({d[1] for d in pred})
        return f"{len(pred)} objects" + (f": {', '.join(names[:5])}" if names else "")
    classes = sorted(int(c) for c in np.unique(pred) if c)
    return f"classes {classes}" if classes else "background"


def log_fields(task: str, pred) -> dict:
    if task == "classification":
        return {"top": [pred[0][1], round(pred[0][2], 4)] if pred else None}
    if task == "detection":
        return {"detections": len(pred)}
    return {"classes": sorted(int(c) for c in np.unique(pred) if c)}


def draw_prediction(frame, task, pred, labels):
    if task == "classification":
        overlay.draw_classification(frame, [(label, score) for _, label, score in pred])
    elif task == "detection":
        if pred:
            overlay.draw_detections(frame, [d[3] for d in pred], [d[2] for d in pred], [d[0] for d in pred],
                                    labels or None)
    else:
        overlay.draw_segmentation(frame, pred)
    return frame


class _Display:
    """cv2.imshow window; 'q' or Esc stops.  An OpenCV without GUI support (opencv-python-headless)
    turns it off with one warning."""

    def __init__(self):
        self.ok = True

    def show(self, frame) -> bool:
        """False when the user asked to quit."""
        if not self.ok:
            return True
        try:
            cv2.imshow("edge-cbn", frame)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error:
            self.ok = False
            warn("this OpenCV has no window support (opencv-python-headless?): running headless; "
                 "use --serve PORT for a browser preview")
            return True
        return key not in (27, ord("q"))

    def close(self):
        if self.ok:
            with contextlib.suppress(cv2.error):
                cv2.destroyAllWindows()


class _Recorder:
    def __init__(self, path, fps):
        self.path, self.fps, self.writer, self.size = str(path), fps or 10.0, None, None

    def write(self, frame):
        if self.writer is None:
            self.size = (frame.shape[1], frame.shape[0])
            self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise StreamError(f"cannot write video {self.path}")
        if (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size)
        self.writer.write(frame)

    def close(self):
        if self.writer is not None:
            self.writer.release()


class StreamLoop:
    """Drive `source` through `engine` into the outputs `opts` asks for; `run()` returns the summary."""

    def __init__(self, engine: Engine, source, opts: StreamOptions, *, model_name: str, stop=None, echo=None,
                 until=None):
        self.engine, self.source, self.opts = engine, source, opts
        self.until = until  # optional: stop once until() is true (benchmarks)
        self.model_name = model_name
        self.stop = stop or threading.Event()
        self.echo = echo or (lambda msg: click.echo(msg, err=True))
        self.fps = overlay.FpsCounter(10)

    def status(self, frames, result) -> dict:
        e = self.engine
        return {"model": self.model_name, "task": e.task, "source": self.source.name,
                "fps": round(self.fps.fps, 2), "frames": frames, "noise": e.noise_text,
                "calibration": e.calibration_text(),
                "calibration_progress": round(e.cal.progress, 4) if e.cal else (1.0 if e.calibrated else None),
                "noise_pool": self.opts.noise_pool if self.opts.noise_on else None,
                "refuses": e.refuses, "latency_ms": round(result.latency_ms, 2) if result else None,
                "result": describe(e.task, result.prediction) if result else None}

    def run(self) -> dict:
        opts, e = self.opts, self.engine
        display = None if opts.headless else _Display()
        recorder = _Recorder(opts.record, self.source.fps) if opts.record else None
        preview = logf = None
        latency_sum = 0.0
        frames = 0
        start = time.perf_counter()
        try:
            if opts.serve is not None:
                from .preview import PreviewServer
                try:
                    preview = PreviewServer(opts.host, opts.serve)
                except OSError as err:
                    raise StreamError(f"cannot serve on {opts.host}:{opts.serve}: {err.strerror or err}") from None
                if not opts.quiet:
                    self.echo(f"preview on {preview.url}")
            if opts.log:
                try:
                    logf = open(opts.log, "w", buffering=1)
                except OSError as err:
                    raise StreamError(f"cannot write the log {opts.log}: {err.strerror or err}") from None
            next_progress = time.monotonic() + opts.progress_every
            start = time.perf_counter()
            while not self.stop.is_set() and (opts.frames is None or frames < opts.frames) and not (
                    self.until and self.until()):
                frame = self.source.read()
                if frame is None:
                    break
                result = e.process(frame, frames)
                frames += 1
                latency_sum += result.latency_ms
                self.fps.tick()
                if display or recorder or preview:  # headless without outputs: nobody sees an overlay
                    draw_prediction(frame, e.task, result.prediction, e.proc.labels)
                    progress, label = None, ""
                    if e.cal is not None:
                        progress = e.cal.progress
                        label = (f"calibrating {progress:.0%}" if not e.cal.warm
                                 else f"calibrated ({e.refuses} re-fuses)")
                    overlay.draw_hud(frame, self.fps.fps, e.noise_text, progress, label)
                if logf is not None:
                    line = {"frame": frames - 1, "latency_ms": round(result.latency_ms, 3),
                            "calibrating": result.calibrating, "refuses": e.refuses,
                            **log_fields(e.task, result.prediction)}
                    if e.cal is not None:
                        line["progress"] = round(e.cal.progress, 4)
                    if result.sample is not None:
                        line["agreement"] = result.sample
                    logf.write(json.dumps(line) + "\n")
                if preview is not None:
                    preview.publish(frame)
                    preview.update_status(self.status(frames, result))
                if recorder is not None:
                    recorder.write(frame)
                if display is not None and not display.show(frame):
                    break
                if (display is None or not display.ok) and not opts.quiet and time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + opts.progress_every
                    cal = f"  calibration {e.calibration_text()}" if e.cal else ""
                    self.echo(f"frames {frames}  fps {self.fps.fps:.1f}{cal}  refuses {e.refuses}  "
                              f"{describe(e.task, result.prediction)}")
        finally:
            elapsed = time.perf_counter() - start
            try:
                e.save(frames)
            finally:
                for closer in (recorder, display, preview, e):
                    if closer is not None:
                        with contextlib.suppress(Exception):
                            closer.close()
            summary = self.summary(frames, elapsed, latency_sum)
            if logf is not None:
                logf.write(json.dumps({"summary": summary}) + "\n")
                logf.close()
        return summary

    def summary(self, frames, elapsed, latency_sum) -> dict:
        e, opts = self.engine, self.opts
        return {"frames": frames, "fps": round(frames / elapsed, 2) if elapsed > 0 and frames else 0.0,
                "seconds": round(elapsed, 2),
                "latency_ms": round(latency_sum / frames, 2) if frames else None,
                "refuses": e.refuses, "calibrated": e.calibrated,
                **e.agreement_summary(frames),
                "calibration": e.calibration_text(),
                "calibration_progress": round(e.cal.progress, 4) if e.cal else None,
                "model": self.model_name, "task": e.task, "source": self.source.name,
                "noise": opts.noise, "eta": opts.eta if opts.noise_on else None, "seed": opts.seed,
                "noise_options": opts.noise_options, "noise_pool": opts.noise_pool, "mode": opts.mode if e.cal else None,
                "state": opts.state, "resumed": e.resumed}


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, source=None):
    """SIGTERM and Ctrl-C set `stop` (the loop finishes its frame, saves and exits); a second Ctrl-C
    interrupts at once.  Only in the main thread (signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        if source is not None and source.live:  # a camera may be waiting to reconnect: end that wait
            source.close()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def load_model(model: str | None, echo=None):
    """`--model NAME|FILE.tflite` -> (bundle, display name); problems as one StreamError line."""
    from .resolve import ModelNotFound, resolve_model

    try:
        path = resolve_model(model, echo=echo or (lambda *a, **k: click.echo(*a, **k)))
    except ModelNotFound as e:
        raise StreamError(str(e)) from None
    try:
        bundle = load_bundle(path)
    except Exception as e:
        raise StreamError(f"cannot load {path}: {e}") from None
    return bundle, bundle.meta.get("model") or Path(path).stem


def open_frames(camera=None, video=None, images=None, loop=False, width=640, height=480, picamera2=False):
    """The frame source, read one frame ahead in a thread; no source = the bundled sample clip, looped."""
    if camera is None and video is None and images is None:
        loop = True
    if (camera is not None and str(camera).isdigit() and sys.platform.startswith("linux")
            and not (picamera2 and int(camera) == 0) and not os.path.exists(f"/dev/video{int(camera)}")):
        raise StreamError(f"camera {camera} not found: /dev/video{int(camera)} does not exist")
    quiet_opencv = contextlib.nullcontext()
    with contextlib.suppress(Exception):
        quiet_opencv = _opencv_log_level(cv2.utils.logging.LOG_LEVEL_ERROR)  # its own warnings at open
    try:
        with quiet_opencv:
            return Prefetched(open_source(camera=camera, video=video, images=images, loop=loop, width=width,
                                          height=height, picamera2=picamera2))
    except (SourceError, ValueError, FileNotFoundError) as e:
        raise StreamError(str(e)) from None


@contextlib.contextmanager
def _opencv_log_level(level):
    old = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(level)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(old)


POOL_HELP = ("Temporal noise: K pre-drawn noise states cycled per frame (a seeded pick each frame): no "
             "per-frame cost, but frames see only K variants, rebuilt at each re-fuse (a re-fuse costs K "
             "interpreter builds). 0 = exact: every frame draws its own noise and builds its interpreter "
             "(faithful but slow: the build costs more than the invoke).")


@click.command("stream")
@click.option("--camera", help="Camera index or device path (e.g. 0 or /dev/video2).")
@click.option("--video", type=click.Path(dir_okay=False), help="Video file.")
@click.option("--images", type=click.Path(file_okay=False), help="Folder of images (sorted by name).")
@click.option("--loop", is_flag=True, help="Start the video/image folder again at its end (the bundled sample "
              "clip used without a source always loops).")
@click.option("--width", type=int, default=640, show_default=True, help="Camera capture width.")
@click.option("--height", type=int, default=480, show_default=True, help="Camera capture height.")
@click.option("--picamera2", is_flag=True, help="Camera 0 through picamera2 (Raspberry Pi camera modules) "
              "instead of OpenCV/V4L2.")
@click.option("--model", help="Registered name or exported FILE.tflite (with FILE.cbn.npz and FILE.calib.tflite "
              "beside it). Default: efficientnet_lite0 (converted once on first use; needs TensorFlow).")
@click.option("--num-threads", type=int, default=None, show_default="number of CPUs", help="LiteRT threads.")
@click.option("--max-results", type=int, default=3, show_default=True, help="Classification: classes shown.")
@click.option("--score-threshold", type=float, default=0.25, show_default=True, help="Detection: min score.")
@click.option("--noise", type=click.Choice(PRESETS), default="none", show_default=True,
              help="Simulated analog weight noise preset (docs/NOISE.md).")
@click.option("--eta", type=float, default=0.05, show_default=True, help="Noise level.")
@click.option("--seed", type=int, default=0, show_default=True, help="Chip seed (the simulated device instance).")
@click.option("--noise-option", "noise_option", multiple=True, metavar="KEY=VALUE",
              help="Override a preset's option, repeatable, e.g. t_granularity=weight (docs/NOISE.md).")
@click.option("--noise-pool", type=int, default=StreamOptions.noise_pool, show_default=True, metavar="K",
              help=POOL_HELP)
@click.option("--calibrate/--no-calibrate", default=None,
              help="Re-estimate BN statistics on the stream (default: when --noise is not none).")
@click.option("--mode", type=click.Choice(MODES), default=StreamOptions.mode, show_default=True,
              help="shift: correct only the noise-induced change (runs the clean variant too on calibration "
                   "frames); absolute: the paper's re-estimation; prior: blend with the source statistics.")
@click.option("--window", type=float, default=StreamOptions.window, show_default=True, metavar="N",
              help="Moments window: a cumulative average over the first N calibration frames, then an EMA over "
                   "about N frames, which follows drift (docs/RESULTS.md: shorter windows lost accuracy on "
                   "natural-photo crops).")
@click.option("--refuse-every", type=int, default=StreamOptions.refuse_every, show_default=True,
              help="Warm-up: calibration frames per stage (a re-fuse ends each stage).")
@click.option("--stages", type=int, default=StreamOptions.stages, show_default=True,
              help="Warm-up stages: BN layers calibrated depth first, group by group (capped at the number "
                   "of BN layers: one layer per stage).")
@click.option("--track-every", type=int, default=StreamOptions.track_every, show_default=True,
              help="After the warm-up: re-fuse every N calibration frames (tracks drift).")
@click.option("--calibration-budget", type=float, default=StreamOptions.calibration_budget, show_default=True,
              metavar="F", help="Share of the frame time calibration may add (a quarter of it once 192 calibration "
                                "frames are in): "
                                "calibration frames run the calibration variant with exact per-frame noise (and the "
                                "clean variant in shift mode), so they cost a few invokes; the stream keeps about "
                                "1 - F of its noisy frame rate.")
@click.option("--calibrate-every", type=int, default=None, metavar="K",
              help="Instead of the budget: calibrate on every K-th frame, every 4K-th once 192 calibration frames "
                   "are in.")
@click.option("--state", type=click.Path(dir_okay=False),
              help="Save the calibration state to FILE (.npz) and the last good calibrated model beside it "
                   "(FILE-stem.calibrated.tflite + .cbn.npz), atomically; resume from them on start.")
@click.option("--save-interval", type=float, default=30.0, show_default=True, metavar="SECONDS",
              help="Save after a re-fuse at most every SECONDS (0: after every re-fuse); always at exit.")
@click.option("--agreement-every", type=int, default=10, show_default=True, metavar="N",
              help="With noise: every N-th frame (frames N-1, 2N-1, ...) also run the clean model and the "
                   "uncalibrated noisy model — only on those sampled frames — and report the served "
                   "prediction's agreement with the clean one, before and after calibration. 0: off (saves the "
                   "memory of those two models).")
@click.option("--frames", type=int, help="Stop after N frames.")
@click.option("--headless", is_flag=True, help="No window (automatic without DISPLAY/WAYLAND_DISPLAY).")
@click.option("--record", type=click.Path(dir_okay=False), help="Write the annotated frames to an .mp4.")
@click.option("--serve", type=int, metavar="PORT", help="Browser preview (MJPEG + /status JSON) on PORT.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Preview address (0.0.0.0: all).")
@click.option("--log", type=click.Path(dir_okay=False), help="JSON lines: one per frame, then {\"summary\": ...}.")
@click.option("--quiet", is_flag=True, help="No progress lines (warnings, errors and the summary only).")
def main(camera, video, images, loop, width, height, picamera2, model, num_threads, max_results, score_threshold,
         noise, eta, seed, noise_option, noise_pool, calibrate, mode, window, refuse_every, stages, track_every, calibration_budget,
         calibrate_every,
         state,
         save_interval, agreement_every, frames, headless, record, serve, host, log, quiet):
    """Live inference on a camera, video or image folder (default: the bundled sample clip) under
    simulated analog weight noise, with Calibrated BatchNorm re-estimated on the device at batch size 1.

    \b
    edge-cbn stream                                   sample clip, clean model, window or headless
    edge-cbn stream --noise relative --eta 0.05       noisy chip, calibrating as it streams
    edge-cbn stream --camera 0 --serve 8080 --state /var/lib/edge-cbn/state.npz
    Ctrl-C or SIGTERM stop cleanly (state saved); 'q' in the window too.
    """
    num_threads = num_threads or os.cpu_count()
    noise_options = cli_noise_options(noise, noise_option)
    has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    opts = StreamOptions(num_threads=num_threads, max_results=max_results, score_threshold=score_threshold,
                         noise=noise, eta=eta, seed=seed, noise_options=noise_options, noise_pool=noise_pool, calibrate=calibrate, mode=mode,
                         window=window, refuse_every=refuse_every, stages=stages, track_every=track_every,
                         calibration_budget=calibration_budget, calibrate_every=calibrate_every,
                         agreement_every=agreement_every, state=state, save_interval=save_interval,
                         frames=frames, headless=headless or not has_display, record=record, serve=serve,
                         host=host, log=log, quiet=quiet)
    if frames is not None and frames < 1:
        raise StreamError("--frames must be >= 1")
    echo = (lambda *a, **k: None) if quiet else (lambda msg, **k: click.echo(msg, err=True))
    source = open_frames(camera, video, images, loop, width, height, picamera2)
    stop = threading.Event()
    try:
        with stop_on_signals(stop, source):  # a SIGTERM while the models load stops before the first frame
            bundle, name = load_model(model, echo=lambda *a, **k: click.echo(*a, **{**k, "err": True}))
            engine = Engine(bundle, opts, echo=echo)
            summary = StreamLoop(engine, source, opts, model_name=name, stop=stop).run()
    finally:
        source.close()
    if not quiet:
        before, after = summary["agreement_before"], summary["agreement_after"]
        agree = (f"  agreement ({summary['agreement_metric']}) {before}% -> {after}%"
                 if before is not None else "")
        click.echo(f"{summary['frames']} frames at {summary['fps']} fps, {summary['refuses']} re-fuses{agree}",
                   err=True)
    click.echo(json.dumps({"summary": summary}))


if __name__ == "__main__":
    sys.exit(main())
