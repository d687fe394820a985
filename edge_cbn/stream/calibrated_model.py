"""One object for the task (in the manner of MediaPipe Tasks' `ImageClassifier`): `CalibratedModel` is an
exported model on a simulated noisy chip that re-estimates its BatchNorm statistics at batch size 1 and
serves with them.  Options are dataclasses, noise models typed classes (`runtime.noise_models`).

    model = CalibratedModel.from_file("lite0.tflite", noise=Relative(eta=0.05), seed=0)
    model.calibrate(frames)             # BGR frames, batch size 1 on LiteRT
    model.predict(frame)                # top-k, boxes or a mask, under the chip
    model.save("lite0-calibrated.tflite")

`process(frame, index)` is the stream's frame step (`edge-cbn stream` runs the same `Engine`): it decides
by frame index which frames calibrate and when new statistics serve.  Device side: never TensorFlow."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..runtime.noise_models import NoiseModel
from ..runtime.refold import Refolder
from ..runtime.state import write_calibrated_bundle
from ..runtime.stream_calibrator import DEFAULTS as CALIBRATION_DEFAULTS
from .engine import Engine, FrameResult
from .options import StreamOptions
from .resolve import load_model


@dataclasses.dataclass
class CalibrationOptions:
    """How the statistics are re-estimated (the `edge-cbn stream` flags of the same names).

    Attributes:
        mode: "shift" (only the noise-induced change; runs the clean model too), "absolute" (the paper's
            re-estimation) or "prior" (blended with the source statistics).
        calibrate_every: in `process`, every N-th frame calibrates through the warm-up (None: the schedule's
            default, `StreamOptions.cadence`).
        sweep: calibrate every BN layer from each frame through the sweep variant (None: when the model has
            one and the mode is shift).
        warmup_frames: sweep: the warm-up's calibration frames.
        stages: depth first (no sweep): warm-up stages (capped at the number of BN layers).
        refold_every: calibration frames per warm-up stage.
        window: the moments' window in frames (cumulative average, then an EMA).
        track_every: after the warm-up, refold every N calibration frames.
    """
    mode: str = CALIBRATION_DEFAULTS["mode"]
    calibrate_every: int | None = StreamOptions.calibrate_every
    sweep: bool | None = StreamOptions.sweep
    warmup_frames: int = StreamOptions.warmup_frames
    stages: int = StreamOptions.stages
    refold_every: int = CALIBRATION_DEFAULTS["refold_every"]
    window: float = CALIBRATION_DEFAULTS["window"]
    track_every: int = CALIBRATION_DEFAULTS["track_every"]


@dataclasses.dataclass
class CalibratedModelOptions:
    """Everything a `CalibratedModel` can be told besides its model file.

    Attributes:
        noise: the chip's noise model, e.g. `Relative(eta=0.05)`; None runs the model clean.
        seed: the chip's seed (the same seed is the same chip on every machine).
        num_threads: LiteRT threads (None: LiteRT's default).
        max_results: classification: the top-k returned.
        score_threshold: detection: the lowest score returned.
        noise_states: temporal-noise states served in turn (0: exact per-frame noise).
        agreement_every: in `process`, compare with the clean model every N-th frame (0: never).
        calibration: how the statistics are re-estimated.
    """
    noise: NoiseModel | None = None
    seed: int = 0
    num_threads: int | None = None
    max_results: int = 3
    score_threshold: float = 0.25
    noise_states: int = StreamOptions.noise_states
    agreement_every: int = 0
    calibration: CalibrationOptions = dataclasses.field(default_factory=CalibrationOptions)

    def stream_options(self) -> StreamOptions:
        """The same settings as `edge-cbn stream` options.

        Returns:
            The `StreamOptions` of these settings (quiet, no outputs).
        """
        noise = self.noise
        return StreamOptions(
            num_threads=self.num_threads, max_results=self.max_results, score_threshold=self.score_threshold,
            noise=noise.preset if noise else "none", eta=noise.eta if noise else 0.0, seed=self.seed,
            noise_options=noise.options() if noise else {}, noise_states=self.noise_states,
            agreement_every=self.agreement_every, quiet=True, **dataclasses.asdict(self.calibration))


class CalibratedModel:
    """An exported model under a simulated chip, with BN statistics it re-estimates on frames.

    Args:
        bundle: an exported model (`load_bundle`): X.tflite with X.cbn.npz, X.calib.tflite and X.sweep.tflite beside it.
        options: what it runs with (default: clean, calibration defaults).

    Raises:
        StreamError: noise or calibration that the bundle cannot do (no sidecar, no calibration variant), or a
            noise level or option out of range.
        BadInput: the calibration variant's file cannot be used.
        ValueError: a calibration option out of range (e.g. stages < 1, an unknown mode).
        MissingDependency: no TFLite interpreter is installed.
    """

    def __init__(self, bundle, options: CalibratedModelOptions | None = None):
        self.bundle, self.options = bundle, options or CalibratedModelOptions()
        self.engine = Engine(bundle, self.options.stream_options(), background=False)
        self._next_frame = 0  # the inference index of the next frame without one

    @classmethod
    def from_file(cls, path, noise: NoiseModel | None = None, seed: int = 0, **options) -> "CalibratedModel":
        """The model at `path` (a .tflite, or a registered name such as "efficientnet_lite0").

        Args:
            path: the exported model, or a registered model name (converted on first use).
            noise: the chip's noise model; None runs it clean.
            seed: the chip's seed.
            **options: other `CalibratedModelOptions` fields; a `CalibrationOptions` as `calibration`.

        Returns:
            The model, serving its exported statistics until calibrated.

        Raises:
            ModelNotFound: no such file or name.
            BadInput: a file that is not a usable bundle.
            TypeError: an option that is not a `CalibratedModelOptions` field.
            StreamError, ValueError: as the constructor raises them.
        """
        bundle, _ = load_model(str(path), echo=lambda *a, **k: None)
        return cls(bundle, CalibratedModelOptions(noise=noise, seed=seed, **options))

    @property
    def statistics(self) -> dict:
        """The BN statistics serving now: {bn name: (mean, var)}."""
        return self.engine.serving.stats()

    @property
    def calibrated(self) -> bool:
        """True once calibrated statistics serve."""
        return self.engine.calibrated

    def _index(self, index: int | None) -> int:
        if index is None:
            index = self._next_frame
        self._next_frame = index + 1
        return index

    def predict(self, frame_bgr: np.ndarray, index: int | None = None):
        """The prediction for one frame, under the chip, with the statistics serving now.

        Args:
            frame_bgr: an image as OpenCV reads it (H x W x 3, uint8, BGR).
            index: the inference index that draws the chip's temporal noise (default: one more than the
                last frame's).

        Returns:
            Classification: [(class id, label, probability)] best first; detection: [(class id, label,
            score, (x1, y1, x2, y2) in frame pixels)] best first; segmentation: a class mask of the frame's size;
            raw: the model's output arrays (float32 copies).
        """
        proc = self.engine.proc
        x, ctx = proc.preprocess(frame_bgr)
        return proc.postprocess(self.engine.serving.run(x, self._index(index)), ctx)

    def calibrate(self, frames) -> dict:
        """Re-estimate the BN statistics on `frames` at batch size 1, in order, then serve with them.

        Args:
            frames: BGR images (any iterable); each is one calibration frame.

        Returns:
            The calibrated statistics {bn name: (mean, var)}.

        Raises:
            ValueError: nothing to calibrate (the model runs clean, or has no calibration variant), no
                frames, or statistics under which the model gives non-finite outputs (the previous ones
                keep serving).
        """
        engine = self.engine
        if engine.calibration is None:
            raise ValueError("nothing to calibrate: the model runs without noise or has no calibration variant "
                             "(give noise=..., and export it with tools/convert.py)")
        x = None
        for frame in frames:
            x = engine.proc.preprocess(frame)[0].copy()
            engine.calibration.step(x, self._index(None))
        if x is None:
            raise ValueError("no frames to calibrate on")
        stats = engine.calibration.statistics()
        if not engine.serving.set_stats(stats, probe=x):
            raise ValueError("the calibrated statistics give non-finite outputs; the previous ones serve")
        engine.calibrated = True
        return stats

    def process(self, frame_bgr: np.ndarray, index: int) -> FrameResult:
        """Stream mode: frame `index` (0, 1, 2, ... of a stream) served, and calibrated when its index
        says so, exactly as `edge-cbn stream` does.

        Args:
            frame_bgr: an image as OpenCV reads it (H x W x 3, uint8, BGR).
            index: the frame's index in the stream, 0 for the first; it also draws the chip's temporal noise.

        Returns:
            A `FrameResult`: `.prediction`, `.latency_ms`, whether it calibrated or brought new statistics.
        """
        self._next_frame = index + 1
        return self.engine.process(frame_bgr, index)

    def save(self, path) -> Path:
        """Write the model with the statistics serving now as an exported bundle: `path` (.tflite) and its
        sidecar, each atomically; `edge-cbn stream --model PATH` serves it as is.

        Args:
            path: the `.tflite` to write (str or path); its sidecar `.cbn.npz` goes beside it.

        Returns:
            `path`, as a `Path`.

        Raises:
            ValueError: the bundle has no sidecar (no statistics to refold).
            OSError: the files cannot be written there.
        """
        refolder = Refolder(self.bundle)
        stats = self.statistics
        refolder.refold(stats)
        noise = self.options.noise
        info = {"noise": noise.text if noise else "none", "seed": self.options.seed,
                "mode": self.options.calibration.mode}
        return write_calibrated_bundle(self.bundle, stats, refolder.model_bytes(), Path(path), info)

    def close(self) -> None:
        """Stop the engine's workers (nothing to do for a model that only predicts and calibrates)."""
        self.engine.close()

    def __enter__(self) -> "CalibratedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
