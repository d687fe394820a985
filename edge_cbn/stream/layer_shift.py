"""A live Fig. 1 for the preview: per BN layer, how far the layer's input statistics under the chip's
noise sit from the clean model's, uncalibrated and with the statistics serving now.

On the agreement sampler's frames, the calibration variant runs three times: clean, under the chip with
the exported statistics (uncalibrated) and under the chip with the serving ones (calibrated); each run
gives every BN input's per-channel mean and mean square over the frame (`StreamCalibrator.
bn_input_moments`).  Per BN layer, the measure is the Gaussian KL divergence of the clean input from the
noisy one, per channel

    KL(clean ‖ noisy) = ln(σn / σc) + (σc² + (μc − μn)²) / (2 σn²) − 1/2,    σ² = var + the BN's eps,

averaged over the layer's channels, then over the latest `window` sampled frames.  A layer's input
depends only on the statistics of the layers before it, so its calibrated bar shows what calibrating
those did (the first BN's two bars are equal), as in `edge-cbn divergence`, which measures the same
question with histograms of the activations on the workstation.  It costs two exact noisy builds and
three invokes of the variant per sampled frame, so the stream runs it only for the preview (`--serve`).
"""
from __future__ import annotations

import collections

import numpy as np

from ..runtime.noisy_model import NoisyModel
from ..runtime.stream_calibrator import StreamCalibrator


def gaussian_kl(clean: tuple, noisy: tuple, eps: float) -> float:
    """Mean over channels of KL(N(μc, σc²) ‖ N(μn, σn²)), from (E[z], E[z²]) of each, σ² = var + `eps`.

    Args:
        clean, noisy: (per-channel mean, per-channel mean of squares), float arrays.
        eps: the BN's epsilon (a channel constant over the frame has variance 0).

    Returns:
        The mean KL in nats; NaN when a value is not finite.
    """
    (mc, sc), (mn, sn) = (np.asarray(a, np.float64) for a in clean), (np.asarray(a, np.float64) for a in noisy)
    with np.errstate(all="ignore"):
        vc = np.maximum(sc - mc * mc, 0.0) + eps
        vn = np.maximum(sn - mn * mn, 0.0) + eps
        kl = 0.5 * np.log(vn / vc) + (vc + (mc - mn) ** 2) / (2 * vn) - 0.5
    return float(np.mean(kl))


class LayerShift:
    """Per-BN divergence of the noisy input statistics from the clean ones (the module's docstring).

    Args:
        bundle: an exported bundle with its calibration variant.
        chip: the stream's simulated chip.
        num_threads: LiteRT threads of the variant's interpreters.
        seed: the stream's seed (which noise state a frame gets does not matter here: exact noise).
        window: the sampled frames each bar averages.
        clean_variant: the clean variant the stream already runs (None: one of its own).
    """

    def __init__(self, bundle, chip, *, num_threads=None, seed: int = 0, window: int = 20, clean_variant=None):
        variant = bundle.calibration_variant()
        self.calibrator = StreamCalibrator(bundle)
        self.clean = clean_variant or NoisyModel(variant, None, num_threads=num_threads)
        self.noisy = NoisyModel(variant, chip, num_threads=num_threads, noise_states=0, seed=seed)
        self.source = {rec.bn: (rec.mean, rec.var) for rec in bundle.layers if rec.bn}
        self.eps = {rec.bn: rec.eps for rec in bundle.layers if rec.bn}
        self.layers = list(self.source)
        self._rows: collections.deque = collections.deque(maxlen=window)  # (uncalibrated, calibrated) per frame

    def _moments(self, model: NoisyModel, x, frame: int, stats: dict) -> dict:
        return self.calibrator.bn_input_moments(model.run(x, frame)[-1], stats)

    def measure(self, x, frame: int, serving_stats: dict) -> None:
        """Add one frame's divergences.

        Args:
            x: the model input of the frame.
            frame: its noise frame index (the same temporal draw as served).
            serving_stats: {bn: (mean, var)} serving now.
        """
        clean = self._moments(self.clean, x, frame, self.clean.stats())
        self.noisy.set_stats(self.source)
        uncalibrated = self._moments(self.noisy, x, frame, self.source)
        self.noisy.set_stats(serving_stats)
        calibrated = self._moments(self.noisy, x, frame, serving_stats)
        self._rows.append(tuple([gaussian_kl(clean[bn], moments[bn], self.eps[bn]) for bn in self.layers]
                                for moments in (uncalibrated, calibrated)))

    def snapshot(self) -> dict | None:
        """{"layers": BN names, "uncalibrated": [KL], "calibrated": [KL], "samples": frames averaged}, the
        means over the window (None before the first frame; a non-finite mean is None)."""
        if not self._rows:
            return None
        rows = np.asarray(self._rows, np.float64)  # (frames, 2, layers)
        finite = np.isfinite(rows)
        counts = finite.sum(axis=0)
        means = np.where(counts > 0, np.where(finite, rows, 0.0).sum(axis=0) / np.maximum(counts, 1), np.nan)
        as_list = [[round(float(v), 5) if np.isfinite(v) else None for v in row] for row in means]
        return {"layers": self.layers, "uncalibrated": as_list[0], "calibrated": as_list[1],
                "samples": len(self._rows)}
