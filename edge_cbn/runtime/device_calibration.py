"""Calibrated BatchNorm on the device, one frame at a time: the step that `edge-cbn stream` and
`edge-cbn evaluate` both run.

A calibration frame runs the calibration variant under the chip (exact per-frame noise; its extra last
output is every BN input's moments), in `shift` mode the clean variant on the same frame too, feeds both
to the `StreamCalibrator`, and refolds the variant whenever the calibrator hands out new statistics, so
the next calibration frame already runs with them.
"""
from __future__ import annotations

import numpy as np

from .noisy_model import NoisyModel
from .stream_calibrator import StreamCalibrator


class DeviceCalibration:
    """Streaming batch-size-1 calibration of `bundle` under `chip` (calibrator options: see
    `StreamCalibrator`)."""

    def __init__(self, bundle, chip, *, num_threads: int | None = None, seed: int = 0, **calibrator_options):
        self.calibrator = StreamCalibrator(bundle, **calibrator_options)
        variant = bundle.calibration_variant()
        self.noisy = NoisyModel(variant, chip, num_threads=num_threads, seed=seed)
        self.clean = NoisyModel(variant, None, num_threads=num_threads) if self.calibrator.needs_clean else None

    def step(self, x: np.ndarray, frame: int) -> tuple[list[np.ndarray], dict | None]:
        """Calibrate on input `x` (the model input of inference number `frame`).  Returns the model's
        outputs for this frame (without the moments) and the statistics to refold elsewhere when the
        calibrator produced new ones, else None."""
        out = self.noisy.run(x, frame)
        clean_out = self.clean.run(x, frame) if self.clean is not None else None
        stats = self.calibrator.observe(out[-1], self.noisy.stats(),
                                        None if clean_out is None else clean_out[-1],
                                        None if clean_out is None else self.clean.stats())
        if stats is not None:
            self.noisy.set_stats(stats)
        return out[:-1], stats

    def resume(self, stats: dict) -> None:
        """Continue from saved statistics: the variant runs with them from the next frame on."""
        self.noisy.set_stats(stats)

    def statistics(self) -> dict:
        """The calibrated statistics {bn: (mean, var)} as of the last refold."""
        return self.calibrator.statistics()

    def calibrate(self, inputs, *, frame0: int = 0, on_frame=None) -> dict:
        """Calibrate on every input of `inputs` (model inputs, batch of one each) in order; optional
        `on_frame(frames_done)` after each.  Returns `statistics()`."""
        for i, x in enumerate(inputs):
            self.step(x, frame0 + i)
            if on_frame is not None:
                on_frame(i + 1)
        return self.statistics()
