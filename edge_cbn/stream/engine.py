"""The model side of one stream frame: `Engine.process(frame, i)` preprocesses it, runs the noisy
serving model (or, on a calibration frame, the calibration step), refolds the serving model when new
statistics are due, and samples agreement with the clean model.  Device side: never TensorFlow."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..runtime.device_calibration import DeviceCalibration
from ..runtime.noise import make_noise
from ..runtime.noisy_model import NoisyModel, noise_targets
from ..runtime.processing import Processor
from ..runtime.worker import LatestJobWorker
from . import overlay
from .agreement import AgreementSampler, agreement_summary
from .options import StreamError, StreamOptions, warn
from .persistence import Persistence

# Refolds of the calibration variant between updates of the serving model (a pool of interpreters to
# rebuild); calibration frames already serve with the newest statistics.
SERVE_REFUSE_EVERY = 16
# Once CONVERGED_FRAMES calibration frames are in (the estimate has mostly converged by then,
# docs/RESULTS.md), calibration takes TRACKING_SLOWDOWN times less: the statistics only drift.
CONVERGED_FRAMES = 192
TRACKING_SLOWDOWN = 4


@dataclasses.dataclass
class FrameResult:
    prediction: object
    latency_ms: float
    calibrating: bool  # the calibration step ran on this frame
    refolded: bool     # and it produced new statistics
    sample: dict | None = None  # agreement sample of this frame


def make_chip(bundle, opts: StreamOptions):
    """The simulated noisy chip of `opts` for `bundle` (None without noise)."""
    if not opts.noise_on:
        return None
    if not bundle.has_sidecar:
        raise StreamError(f"--noise needs the model's re-fuse sidecar {bundle.path.stem}.cbn.npz next to "
                          f"{bundle.path.name} (written by tools/convert.py)")
    try:
        return make_noise(opts.noise, opts.eta, opts.seed, **opts.noise_options).instantiate(noise_targets(bundle))
    except ValueError as e:
        raise StreamError(f"--noise-option: {e}") from None


def wants_calibration(bundle, opts: StreamOptions) -> bool:
    """--calibrate (default: with noise), when the bundle can: a warning, or an error if asked for."""
    calibrate = opts.noise_on if opts.calibrate is None else opts.calibrate
    if calibrate and not bundle.can_calibrate:
        msg = bundle.calibration_problem or (
            f"{bundle.path.name} has no calibration variant ({bundle.path.stem}.calib.tflite + sidecar): "
            "re-export it with tools/convert.py")
        if opts.calibrate:
            raise StreamError(msg)
        warn(msg + "; streaming without calibration")
        return False
    return calibrate


class Engine:
    """Serving model (under noise), calibration step, state persistence and agreement sampling of a
    stream.  `process(frame_bgr, i)` handles stream frame `i`."""

    def __init__(self, bundle, opts: StreamOptions, *, echo=None):
        self.bundle, self.opts = bundle, opts
        self.echo = echo or (lambda msg: None)
        self.proc = Processor(bundle, max_results=opts.max_results, conf_threshold=opts.score_threshold)
        self.task = self.proc.task
        self.noise_text = overlay.noise_text(opts.noise if opts.noise_on else None, opts.eta, opts.seed)
        self.chip = make_chip(bundle, opts)
        self.calibration = DeviceCalibration(bundle, self.chip, num_threads=opts.num_threads, seed=opts.seed,
                                             **opts.calibrator_options()) if wants_calibration(bundle, opts) else None
        self.cal = self.calibration and self.calibration.calibrator
        self.persistence = Persistence.open(bundle, opts, calibrating=self.cal is not None)
        resumed = self.persistence and self.persistence.resume(self.cal)
        counters = resumed.counters if resumed else {}
        self.resumed = resumed is not None
        self.frame0, self.refuses, self.calibration_frames = (
            int(counters.get(k, 0)) for k in ("frames", "refuses", "calibration_frames"))
        self.calibrated = self.refuses > 0  # calibrated statistics are in force
        self.rollbacks = 0  # re-fuses the probe refused
        self.serving = self._serving_model(resumed)
        if resumed and self.calibration:
            self.calibration.resume(resumed.stats)
        # The serving model is refolded beside the stream when that is safe (it picks ready-made
        # interpreters per frame: pooled, static or clean); `NoisyModel.set_stats` builds before it swaps.
        # --calibrate-every makes a run reproducible: refolds then happen in line, so which statistics serve
        # which frame does not depend on thread timing (the same command gives the same figures anywhere).
        exact = self.serving.per_frame and not self.serving.pool
        self._serving_updates = LatestJobWorker(self._update_serving, name="edge-cbn-refold",
                                                background=not exact and not opts.calibrate_every)
        self.agreement = AgreementSampler(
            bundle, self.chip, self.proc, every=opts.agreement_every, num_threads=opts.num_threads,
            seed=opts.seed, clean_variant=self.calibration and self.calibration.clean
        ) if opts.noise_on and opts.agreement_every else None
        # Time spent in process(): all of it, the part calibration added over serving, a served frame.
        self._elapsed_ms = self._calibration_ms = self._serve_ms = 0.0

    def _serving_model(self, resumed) -> NoisyModel:
        """The calibrated model on disk when resuming from it, else the source model (with the saved
        statistics refolded when resuming without the model)."""
        opts = self.opts
        kwargs = dict(num_threads=opts.num_threads, pool=opts.noise_pool, seed=opts.seed)
        if resumed and resumed.model_path is not None:
            self.echo(f"resumed from {resumed.model_path} ({self.refuses} re-fuses, {self.frame0} frames)")
            return NoisyModel(resumed.model_bundle, self.chip, **kwargs)
        serving = NoisyModel(self.bundle, self.chip, **kwargs)
        if resumed:
            serving.set_stats(resumed.stats)
            self.echo(f"resumed from {opts.state} ({resumed.note}: re-fused the saved statistics)")
        return serving

    def calibration_text(self) -> str:
        if self.cal is None:
            return "calibrated (frozen)" if self.calibrated else "off"
        if not self.cal.warm:
            done = round(self.cal.progress * self.cal.warmup_frames)
            return f"warm-up {done}/{self.cal.warmup_frames} (stage {self.cal.stage + 1}/{self.cal.stages})"
        return f"calibrated, tracking ({self.refuses} re-fuses)"

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
        calibrating = self.calibration is not None and self._calibration_due(i)
        if calibrating:
            outputs, refolded = self._calibrate(x, fi, i)
        else:
            outputs, refolded = self.serving.run(x, fi), False
        pred = self.proc.postprocess(outputs, ctx)
        latency = self._account((time.perf_counter() - t) * 1e3, calibrating, i)
        sample = None
        if self.agreement is not None and self.agreement.due(i):
            sample = self.agreement.sample(x, ctx, fi, i, pred)
        return FrameResult(pred, latency, calibrating, refolded, sample)

    def _calibrate(self, x, fi: int, i: int) -> tuple[list, bool]:
        was_warm = self.cal.warm
        outputs, stats = self.calibration.step(x, fi)
        self.calibration_frames += 1
        if stats is None:
            return outputs, False
        self.refuses += 1
        self.calibrated = True
        warmed = self.cal.warm and not was_warm
        if warmed or self.refuses % SERVE_REFUSE_EVERY == 0:
            cal_state = self.cal.state_dict() if self.persistence and self.persistence.saver else None
            # The end of the warm-up is always saved, whatever --save-interval says.
            # The frame the statistics came from is the probe the new serving model must pass.
            self._serving_updates.submit((stats, self._counters(i + 1), cal_state, warmed, x))
        return outputs, True

    def _account(self, latency: float, calibrating: bool, i: int) -> float:
        self._elapsed_ms += latency
        if calibrating:
            self._calibration_ms += max(latency - self._serve_ms, 0.0)
        else:  # running mean of a served frame's cost
            self._serve_ms += (latency - self._serve_ms) / (min(i, 50) + 1)
        return latency

    # ------------------------------------------------------------------------------- refold and save
    def _update_serving(self, job) -> None:
        """Refold `stats` into the serving model (background thread when safe) if it gives finite outputs
        on the probe frame, else keep the previous statistics (logged, not saved); then maybe save."""
        stats, counters, cal_state, force, probe = job
        if stats is not None and not self.serving.set_stats(stats, probe=probe):
            self.rollbacks += 1
            warn(f"re-fuse at frame {counters['frames']}: non-finite outputs on the probe frame; "
                 f"the serving model keeps its previous statistics ({self.rollbacks} rolled back)")
            return
        if self.persistence is not None and self.persistence.due(force):
            self.persistence.save(stats or self.calibration.noisy.stats(), cal_state, counters)

    def _counters(self, frames_done: int) -> dict:
        return {"frames": self.frame0 + frames_done, "refuses": self.refuses,
                "calibration_frames": self.calibration_frames,
                "progress": self.cal.progress if self.cal else None}

    def save(self, frames_done: int) -> None:
        """Save now (at exit): waits for pending refolds, then for the write."""
        self._serving_updates.wait()
        if self.persistence is not None and self.persistence.saver is not None:
            self._update_serving((None, self._counters(frames_done), self.cal.state_dict(), True, None))
            self.persistence.flush()

    def agreement_summary(self, frames_total: int) -> dict:
        return agreement_summary(self.task, self.agreement, frames_total)

    def close(self) -> None:
        self._serving_updates.close()
        if self.persistence is not None:
            self.persistence.close()
