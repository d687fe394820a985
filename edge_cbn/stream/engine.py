"""The model side of one stream frame: `Engine.process(frame, i)` preprocesses it, runs the noisy
serving model, hands calibration frames to the calibration worker (`pipeline`), swaps in what the
calibration produced when its frame comes, and samples agreement with the clean model.  Which frames
calibrate and when new statistics serve are decided by frame index: the same command gives the same
predictions and summary on any machine.  Device side: never TensorFlow."""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from ..runtime.device_calibration import DeviceCalibration
from ..runtime.errors import BadInput
from ..runtime.interpreter import DELEGATE_NAMES, Delegate, open_delegate
from ..runtime.noise import make_noise
from ..runtime.noisy_model import NoisyModel, noise_targets
from ..runtime.processing import Processor
from . import overlay
from .agreement import AgreementSampler, agreement_summary
from .layer_shift import LayerShift
from .options import StreamError, StreamOptions, warn
from .persistence import Persistence
from .pipeline import CalibrationPipeline, CalibrationResult

# Refolds of the calibration variant between updates of the serving model (noise states, interpreters to
# rebuild): at the warm-up's cadence, and once calibration only tracks; the end of the warm-up always updates it.
SERVE_REFOLD_EVERY = 8
SERVE_REFOLD_EVERY_TRACKING = 4
CALIBRATION_THREADS = 1


@dataclasses.dataclass
class FrameResult:
    prediction: object
    latency_ms: float
    calibrating: bool  # this frame was handed to the calibration
    refolded: bool     # a calibration result that brought new statistics was taken in at this frame
    sample: dict | None = None  # agreement sample of this frame


def make_chip(bundle, opts: StreamOptions):
    """The simulated noisy chip of `opts` for `bundle` (None without noise)."""
    if not opts.noise_on:
        return None
    if not bundle.has_sidecar:
        raise StreamError(f"--noise needs the model's refold sidecar {bundle.path.stem}.cbn.npz next to "
                          f"{bundle.path.name} (written by tools/convert.py)")
    try:
        return make_noise(opts.noise, opts.eta, opts.seed, **opts.noise_options).instantiate(noise_targets(bundle))
    except ValueError as e:
        raise StreamError(f"--noise-option: {e}") from None


def serving_delegate(bundle, opts: StreamOptions) -> Delegate:
    """--delegate: where serving runs, loaded once and checked on the model; with auto, a notice when it
    falls back to the CPU.

    Args:
        bundle: the exported `Bundle` to serve.
        opts: the stream's `StreamOptions` (`delegate`, `delegate_options`).

    Returns:
        The `Delegate` every serving interpreter is built with.

    Raises:
        StreamError: the delegate cannot be loaded or cannot run the model (one line naming the library).
    """
    try:
        delegate = open_delegate(opts.delegate, opts.delegate_options, model_content=bundle.model_bytes)
    except BadInput as e:  # a path names itself once; a name says which library it tried
        typo = not any(c in opts.delegate for c in "./\\") and opts.delegate not in DELEGATE_NAMES
        hint = f" (--delegate takes {', '.join(DELEGATE_NAMES)} or a delegate library)" if typo else ""
        raise StreamError(f"--delegate{'' if e.path == opts.delegate else ' ' + opts.delegate}: {e}{hint}") from None
    if delegate.notice:
        warn(delegate.notice)
    return delegate


def uses_sweep(bundle, opts: StreamOptions) -> bool:
    """--sweep (default: when the bundle has a sweep variant and the mode is shift); --sweep for a bundle or
    mode without one is an error."""
    problem = ("the sweep calibrates in --mode shift only" if opts.mode != "shift" else
               "" if bundle.can_sweep else f"{bundle.path.name} has no sweep variant ({bundle.path.stem}.sweep.tflite: "
               "re-export it with tools/convert.py)")
    if opts.sweep and problem:
        raise StreamError(f"--sweep: {problem}")
    if opts.sweep is None and opts.mode == "shift" and problem:
        warn(f"{problem}; calibrating depth first, one BN layer per calibration frame (slower to calibrate)")
    return opts.sweep is not False and not problem


def wants_calibration(bundle, opts: StreamOptions) -> bool:
    """--calibrate (default: with noise), when the bundle can: a warning, or an error if asked for."""
    calibrate = opts.noise_on if opts.calibrate is None else opts.calibrate
    if calibrate and bundle.has_sidecar and not any(rec.bn for rec in bundle.layers):
        warn(f"{bundle.path.name} has no BatchNorm layer: there is nothing to calibrate; streaming it as it is")
        return False
    if calibrate and not bundle.can_calibrate:
        msg = bundle.calibration_problem or (
            f"{bundle.path.name} has no calibration variant ({bundle.path.stem}.calib.tflite + sidecar): "
            "re-export it with tools/convert.py")
        if opts.calibrate:
            raise StreamError(msg)
        warn(msg + "; streaming without calibration")
        return False
    return calibrate


@dataclasses.dataclass
class CalibrationStatus:
    """What the stream knows of its calibration at the frame it serves: the results of calibration frames
    up to the pipeline's lag back (so the same at the same frame on every machine)."""
    progress: float = 0.0
    warm: bool = False
    text: str = "warm-up"
    dropped_frames: int = 0
    rejected_estimates: int = 0
    calibrated_frame: int | None = None      # the frame from which the warm-up's statistics serve
    calibrated_seconds: float | None = None  # seconds into the stream when that frame came

    def take(self, result: CalibrationResult) -> None:
        self.progress, self.text = result.progress, result.text
        self.warm = self.warm or result.warmed
        self.dropped_frames, self.rejected_estimates = result.dropped_frames, result.rejected_estimates


class Engine:
    """Serving model (under noise), calibration pipeline, state persistence and agreement sampling of a
    stream.  `process(frame_bgr, i)` handles stream frame `i`; `background=False` runs the calibration in
    the serving thread (the same results, frame for frame).

    Args:
        bundle: the exported `Bundle` to serve.
        opts: the stream's `StreamOptions`.
        echo: callable(message) for one-line notes (what was resumed); None: silent.
        background: False runs the calibration in the serving thread instead of a worker thread.

    Raises:
        StreamError: noise for a bundle without its sidecar, a bad noise option or level, --calibrate for a
            bundle without a calibration variant, or a --delegate that cannot be loaded or cannot run the model.
        BadInput: the calibration variant's file cannot be used, or --state points where it cannot be saved.
        ValueError: a calibration option out of range (`StreamCalibrator`), or a letterboxing model that takes
            uint8 input (`Processor`).
        MissingDependency: no TFLite interpreter is installed.
    """

    def __init__(self, bundle, opts: StreamOptions, *, echo=None, background: bool = True):
        self.bundle, self.opts = bundle, opts
        self.echo = echo or (lambda msg: None)
        self.proc = Processor(bundle, max_results=opts.max_results, conf_threshold=opts.score_threshold)
        self.task = self.proc.task
        self.noise_text = overlay.noise_text(opts.noise if opts.noise_on else None, opts.eta, opts.seed)
        self.chip = make_chip(bundle, opts)
        # Only serving runs on the delegate: calibration, the clean model and agreement sampling stay on the CPU.
        self.delegate = serving_delegate(bundle, opts)
        # Calibration runs on a core of its own, one thread; while it warms up, serving keeps the others.
        calibrate = wants_calibration(bundle, opts)
        self.sweep = calibrate and uses_sweep(bundle, opts)
        self.cadence = opts.cadence(self.sweep)
        self.calibration = DeviceCalibration(bundle, self.chip, num_threads=CALIBRATION_THREADS, seed=opts.seed,
                                             **opts.calibrator_options(self.sweep)) if calibrate else None
        self.cal = self.calibration and self.calibration.calibrator
        self.persistence = Persistence.open(bundle, opts, calibrating=self.cal is not None, sweep=self.sweep)
        resumed = self.persistence and self.persistence.resume(self.cal)
        counters = resumed.counters if resumed else {}
        self.resumed = resumed is not None
        self.frame0, self.refolds, self.calibration_frames = (
            int(counters.get(k, 0)) for k in ("frames", "refolds", "calibration_frames"))
        # The worker's own counts (what a save records), apart from the stream's view of them.
        self._worker_refolds, self._worker_frames = self.refolds, self.calibration_frames
        self._probed_stats = None  # the worker's newest statistics that passed the probe
        self._worker_done = 0  # this run's frames up to the worker's last calibration frame
        self.calibrated = self.refolds > 0  # calibrated statistics are in force
        self.rollbacks = 0  # refolds the probe refused
        self.serving = self._serving_model(resumed, self._serving_threads())
        if resumed and self.calibration:
            self.calibration.resume(resumed.stats)
        self.status = CalibrationStatus()
        if self.cal is not None:
            self.status.progress, self.status.warm = self.cal.progress, self.cal.warm
            self.status.text = self._calibrator_text()
            if self.cal.warm:  # resumed calibrated
                self.status.calibrated_frame, self.status.calibrated_seconds = 0, 0.0
        # The calibration worker's tasks and an agreement sample each build a transient model: one at a
        # time keeps the peak memory one model lower (and they share the clean variant).
        self.model_lock = threading.Lock()
        self.pipeline = CalibrationPipeline(self._calibrate, self.serving, background=background,
                                            num_threads=opts.num_threads, lock=self.model_lock,
                                            on_probed=self._probed, on_refused=self._refused) \
            if self.calibration else None
        self._next_calibration = 0
        self.agreement = AgreementSampler(
            bundle, self.chip, self.proc, every=opts.agreement_every, num_threads=opts.num_threads,
            seed=opts.seed, clean_variant=self.calibration and self.calibration.clean,
            lock=self.model_lock
        ) if opts.noise_on and opts.agreement_every else None
        # The preview's live Fig. 1, on the sampled frames: three variant runs each, so only when watched.
        self.layer_shift = LayerShift(
            bundle, self.chip, num_threads=opts.num_threads, seed=opts.seed,
            clean_variant=self.calibration and self.calibration.clean
        ) if self.agreement is not None and opts.serve is not None and bundle.can_calibrate else None
        self._t0 = None

    def _serving_threads(self) -> int | None:
        """Serving's LiteRT threads: all of --num-threads, but one fewer while the depth-first warm-up
        calibrates on a core of its own, one frame in two (its end rebuilds serving with all of them); the
        sweep's calibration frames are few and far between, so serving keeps them all."""
        n = self.opts.num_threads
        warming = self.cal is not None and not self.cal.warm and not self.sweep
        return max(1, n - CALIBRATION_THREADS) if warming and n else n

    def _serving_model(self, resumed, num_threads: int | None) -> NoisyModel:
        """The calibrated model on disk when resuming from it, else the source model (with the saved
        statistics refolded when resuming without the model)."""
        opts = self.opts
        kwargs = dict(num_threads=num_threads, noise_states=opts.noise_states, seed=opts.seed, delegate=self.delegate)
        if resumed and resumed.model_path is not None:
            self.echo(f"resumed from {resumed.model_path} ({self.refolds} refolds, {self.frame0} frames)")
            return NoisyModel(resumed.model_bundle, self.chip, **kwargs)
        serving = NoisyModel(self.bundle, self.chip, **kwargs)
        if resumed:
            serving.set_stats(resumed.stats)
            self.echo(f"resumed from {opts.state} ({resumed.note}: refolded the saved statistics)")
        return serving

    def calibration_text(self) -> str:
        """The calibration's state in one line, as the stream shows it.

        Returns:
            "off", "calibrated (frozen)" (resumed without calibrating), the warm-up's progress, or
            "calibrated at frame N, tracking (K refolds)".
        """
        if self.cal is None:
            return "calibrated (frozen)" if self.calibrated else "off"
        if not self.status.warm:
            return self.status.text
        return f"calibrated at frame {self.status.calibrated_frame}, tracking ({self.refolds} refolds)"

    def _calibrator_text(self) -> str:
        """The calibrator's warm-up, as of its last frame (worker thread)."""
        cal = self.cal
        if cal.warm:
            return "calibrated, tracking"
        done = round(cal.progress * cal.warmup_frames)
        return f"warm-up {done}/{cal.warmup_frames} (stage {cal.stage + 1}/{cal.stages})"

    # ------------------------------------------------------------------------------------------ frame
    @property
    def converged(self) -> bool:
        """Warm, with the cadence's converged_warmups warm-ups' worth of calibration frames in (as the stream
        sees it): calibration only tracks from here on."""
        return (self.cal is not None and self.status.warm
                and self.calibration_frames >= self.cadence.converged_warmups * self.cal.warmup_frames)

    def _calibration_due(self, i: int) -> bool:
        """Calibrate frame `i`?  Every --calibrate-every frames until the stream sees the warm-up's end,
        SECOND_PASS_SLOWDOWN times less until converged, TRACKING_SLOWDOWN times less after: a function of
        the frame index alone."""
        if self.calibration is None or i < self._next_calibration:
            return False
        cadence = self.cadence
        self._next_calibration = i + (cadence.tracking_every if self.converged else
                                      cadence.second_every if self.status.warm else cadence.every)
        self.calibration_frames += 1
        return True

    def process(self, frame_bgr: np.ndarray, i: int) -> FrameResult:
        """Stream frame `i` (0-based in this run); every model of the frame uses the same noise frame
        index.

        Args:
            frame_bgr: the frame, a BGR uint8 image (h, w, 3) of any size.
            i: the frame's index in this run: 0, 1, 2, ... (the noise frame index adds the resumed frames).

        Returns:
            The `FrameResult`: `.prediction` (as `Processor.postprocess`), `.latency_ms`, `.calibrating`,
            `.refolded` and the agreement `.sample` (None on frames not sampled).

        Raises:
            Exception: what the calibration worker raised, re-raised at the frame its result is due.
        """
        t = time.perf_counter()
        if self._t0 is None:
            self._t0 = t
        x, ctx = self.proc.preprocess(frame_bgr)
        fi = self.frame0 + i
        refolded = self._take_results(i, t) if self.pipeline is not None else False
        outputs = self.serving.run(x, fi)
        tracking = self.converged
        calibrating = self._calibration_due(i)
        if calibrating:
            self.pipeline.submit(i, fi, x, tracking=tracking)
        pred = self.proc.postprocess(outputs, ctx)
        latency = (time.perf_counter() - t) * 1e3
        sample = None
        if self.agreement is not None and self.agreement.due(i):
            sample = self.agreement.sample(x, ctx, fi, i, pred)
            if self.layer_shift is not None:
                with self.model_lock:
                    self.layer_shift.measure(x, fi, self.serving.stats())
        return FrameResult(pred, latency, calibrating, refolded, sample)

    def _take_results(self, i: int, now: float) -> bool:
        """The calibration results due at frame `i`; True when one brought new statistics."""
        refolded = False
        for result in self.pipeline.sync(i):
            self.status.take(result)
            if result.refolded:
                refolded = self.calibrated = True
                self.refolds += 1
            if result.warmed:
                self.status.calibrated_frame = i
                self.status.calibrated_seconds = round(now - self._t0, 3)
        return refolded

    def _refused(self, update, i: int) -> None:
        """The serving model's first state under `update`'s statistics gave non-finite outputs on its
        calibration frame: the update ended at frame `i`, the previous statistics still serve."""
        self.rollbacks += 1
        warn(f"refold at frame {self.frame0 + update.frame}: non-finite outputs on the probe frame; the serving "
             "model keeps its previous statistics")

    # ---------------------------------------------------------------------- calibration (worker thread)
    def _calibrate(self, i: int, fi: int, x: np.ndarray, serve) -> CalibrationResult:
        """Calibration frame `i`: the step, and new serving statistics (checked on this frame when their
        first state is built) when due."""
        cal = self.cal
        was_warm = cal.warm
        _, stats = self.calibration.step(x, fi)
        self._worker_frames += 1
        self._worker_refolds += stats is not None
        self._worker_done = i + 1
        warmed = cal.warm and not was_warm
        result = CalibrationResult(i, stats is not None, cal.progress, warmed, self._calibrator_text(),
                                   cal.dropped_frames, cal.rejected_estimates)
        if stats is None:
            return result
        dense = self._worker_frames <= self.cadence.converged_warmups * cal.warmup_frames
        if warmed or self._serve_due(self._worker_refolds, dense):
            result.update = serve(stats, x, warmed)
        self._save(False)
        return result

    def _probed(self, update) -> None:
        """`update`'s statistics passed the probe (worker thread): they are what a restart serves, saved at
        once when they end the warm-up."""
        self._probed_stats = update.stats
        self._save(update.warmed)

    def _save(self, force: bool) -> None:
        """Save the newest statistics that passed the probe with the calibrator, when a save is due (worker
        thread)."""
        if self._probed_stats is not None and self.persistence is not None and self.persistence.due(force):
            self.persistence.save(self._probed_stats, self.cal.state_dict(), self._counters(self._worker_done))

    def _serve_due(self, refolds: int, dense: bool) -> bool:
        """Does the serving model take the statistics of refold number `refolds`?  Before convergence
        (`dense`): every SERVE_REFOLD_EVERY-th, or with the sweep, whose every frame refolds every layer, the
        1st, 2nd, 4th, 8th, ... (soon, then rarely: each costs a rebuild of the noise states; the 1st, from one
        frame, is the largest step of all); after it every SERVE_REFOLD_EVERY_TRACKING-th."""
        if not dense:
            return refolds % SERVE_REFOLD_EVERY_TRACKING == 0
        return refolds & (refolds - 1) == 0 if self.sweep else refolds % SERVE_REFOLD_EVERY == 0

    def _counters(self, frames_done: int) -> dict:
        return {"frames": self.frame0 + frames_done, "refolds": self._worker_refolds,
                "calibration_frames": self._worker_frames,
                "progress": self.cal.progress if self.cal else None}

    # ------------------------------------------------------------------------------------- save, close
    def save(self, frames_done: int) -> None:
        """Save now (at exit): waits for the calibration worker, then for the write.

        Args:
            frames_done: the frames processed in this run (the saved frame count adds the resumed ones).

        Raises:
            Exception: what the calibration worker raised, re-raised while waiting for it.
        """
        if self.pipeline is not None:
            self.pipeline.drain()
        if self.persistence is not None and self.persistence.saver is not None:
            self.persistence.save(self.calibration.statistics(), self.cal.state_dict(), self._counters(frames_done))
            self.persistence.flush()

    def agreement_summary(self, frames_total: int) -> dict:
        """The summary's agreement with the clean model (`agreement.agreement_summary`).

        Args:
            frames_total: the frames of the run; samples of its second half count.

        Returns:
            {"agreement_metric", "agreement_samples", "agreement_before", "agreement_after"}: the means in %,
            None without samples.
        """
        return agreement_summary(self.task, self.agreement, frames_total)

    def close(self) -> None:
        """Stop the calibration worker and the state saver."""
        if self.pipeline is not None:
            self.pipeline.close()
        if self.persistence is not None:
            self.persistence.close()
