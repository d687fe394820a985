"""Calibrated BatchNorm on the device, one frame at a time: the step that `edge-cbn stream` and
`edge-cbn evaluate` both run.

A calibration frame runs the calibration variant under the chip (exact per-frame noise; its extra last
output is every BN input's moments), in `shift` mode the clean variant on the same frame too, feeds both
to the `StreamCalibrator`, and refolds the variant whenever the calibrator hands out new statistics, so
the next calibration frame already runs with them.  With `sweep`, the clean variant runs first, and the
sweep variant (`X.sweep.tflite`) runs under the chip with the state the calibrator writes into it; it
calibrates every layer from the frame and is never refolded.
"""
from __future__ import annotations

import numpy as np

from .flatbuffer import buffer_span
from .noisy_model import NoisyModel
from .stream_calibrator import StreamCalibrator


class DeviceCalibration:
    """Streaming batch-size-1 calibration of `bundle` under `chip` (calibrator options: see
    `StreamCalibrator`).

    Args:
        bundle: an exported `Bundle` with its sidecar and calibration variant (`Bundle.can_calibrate`).
        chip: the simulated chip (`Noise.instantiate(noise_targets(bundle))`); None calibrates the clean model.
        num_threads: LiteRT threads of each interpreter (None: LiteRT's default).
        seed: `NoisyModel`'s seed (the chip's own draws come from its noise model's seed).
        **calibrator_options: `StreamCalibrator` keywords: mode, window, prior, refold_every, stages, shrink,
            track_every, power.

    Raises:
        ValueError: a calibrator option out of range or unknown mode, or no calibration variant in the meta
            (`StreamCalibrator`).
        BadInput: the calibration variant's file cannot be used (`Bundle.calibration_variant`).
        MissingDependency: no TFLite interpreter is installed.
    """

    def __init__(self, bundle, chip, *, num_threads: int | None = None, seed: int = 0, **calibrator_options):
        self.calibrator = StreamCalibrator(bundle, **calibrator_options)
        variant = bundle.calibration_variant()
        self.clean = NoisyModel(variant, None, num_threads=num_threads) if self.calibrator.needs_clean else None
        self._states = None
        if self.calibrator.sweep:
            sweep = bundle.sweep_variant()
            self.noisy = NoisyModel(sweep, chip, num_threads=num_threads, seed=seed, build=False)
            self._states = {bn: [buffer_span(sweep.model_bytes, index)[0] for index in indices]
                            for bn, indices in bundle.meta["sweep"]["states"].items()}
            self.noisy.release_file()  # every frame builds it anew: its 20 MB file need not stay resident
        else:
            self.noisy = NoisyModel(variant, chip, num_threads=num_threads, seed=seed)

    def step(self, x: np.ndarray, frame: int) -> tuple[list[np.ndarray], dict | None]:
        """Calibrate on input `x` (the model input of inference number `frame`).  Returns the model's
        outputs for this frame (without the moments) and the statistics to refold elsewhere when the
        calibrator produced new ones, else None.

        Args:
            x: the model input, (1, H, W, 3) float32 (uint8 for a raw-input model), as `Processor.preprocess`
                or `model_input` make it.
            frame: the inference index that draws the chip's temporal noise.

        Returns:
            (outputs, stats): the model's outputs in the exported order, and {bn: (mean, var)} float32 per
            channel when this frame brought new statistics (already refolded here), else None.
        """
        if self._states is not None:
            return self._sweep_step(x, frame)
        out = self.noisy.run(x, frame)
        clean_out = self.clean.run(x, frame) if self.clean is not None else None
        stats = self.calibrator.observe(out[-1], self.noisy.stats(),
                                        None if clean_out is None else clean_out[-1],
                                        None if clean_out is None else self.clean.stats())
        if stats is not None:
            self.noisy.set_stats(stats)
        return out[:-1], stats

    def _sweep_step(self, x: np.ndarray, frame: int) -> tuple[list[np.ndarray], dict | None]:
        """`step` through the sweep variant: its state from the clean moments of the frame, then one invoke."""
        clean_vector = self.clean.run(x, frame)[-1]
        state = self.calibrator.sweep_state(clean_vector)
        self.noisy.patches = [(start, row) for bn, rows in state.items() for start, row in zip(self._states[bn], rows)]
        out = self.noisy.run_fresh(x, frame)
        source = self.calibrator.source  # folded into both variants: the sweep corrects in the graph
        return out[:-1], self.calibrator.observe(out[-1], source, clean_vector, source)

    def resume(self, stats: dict) -> None:
        """Continue from saved statistics: the variant runs with them from the next frame on.

        Args:
            stats: {bn name: (mean, var)}, one value per channel each, e.g. a saved `statistics()`.

        Raises:
            KeyError: a BN name that is not in the sidecar.
        """
        if self._states is None:  # the sweep variant is never refolded: its state carries the estimate
            self.noisy.set_stats(stats)

    def statistics(self) -> dict:
        """The calibrated statistics {bn: (mean, var)} as of the last refold.

        Returns:
            {bn name: (mean, var)}, float32 arrays of one value per channel (`StreamCalibrator.statistics`).
        """
        return self.calibrator.statistics()

    def calibrate(self, inputs, *, frame0: int = 0, on_frame=None) -> dict:
        """Calibrate on every input of `inputs` (model inputs, batch of one each) in order; optional
        `on_frame(frames_done)` after each.  Returns `statistics()`.

        Args:
            inputs: model inputs (an iterable of (1, H, W, 3) arrays, as for `step`).
            frame0: the inference index of the first input; the next ones count up from it.
            on_frame: optional callable, given the number of inputs done after each one.

        Returns:
            `statistics()` after the last input: {bn name: (mean, var)}, float32.
        """
        for i, x in enumerate(inputs):
            self.step(x, frame0 + i)
            if on_frame is not None:
                on_frame(i + 1)
        return self.statistics()
