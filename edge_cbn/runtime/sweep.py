"""The state the sweep variant (`X.sweep.tflite`, `edge_cbn.convert.sweep`) reads: per BN layer, SWEEP_ROWS
constants of one value per channel that turn this frame's moments into the statistics the
`StreamCalibrator` hands out once the frame is added (`shift` mode).  Device side: numpy only.

The graph works on y = s0 * z + c0, the folded layer's output with the source statistics folded in (z the
BN input; s0, c0 the source BN scale and shift).  With m, v the frame's per-channel mean and variance of y:

    mean_n = gain * m + offset                           the noisy mean, with the accumulators and shrink
    var_n  = gain2 * v + spread * (m - centre)^2 + spread_offset
    a^2    = var_n * inv_clean_var + clean_flat          (noisy var / clean var; 1 where the clean var is 0)
    mean   = mean_n + a * shift,   var = source var * a^2
    y'     = A * y + B,  A = sqrt((src var + eps) / (src var * a^2 + eps)),  B = beta - A * (s0 * mean + c0)

which is `StreamCalibrator.estimate` after `Moments.update` of this frame (`Moments.next_frame` gives the
update's coefficients; the clean moments of the frame are already in `clean`, whose model runs first)
refolded: BN with (mean, var) applied to z.
"""
from __future__ import annotations

import numpy as np

from .fold import bn_scale, fold_bias

SWEEP_ROWS = 9
ROW_NAMES = ("gain", "offset", "gain2", "spread", "centre", "spread_offset", "inv_clean_var", "clean_flat", "shift")


def source_fold(rec) -> tuple:
    """(s0, c0, 1/s0 or 0 where s0 is 0) of a BN layer's source statistics, float64."""
    s0 = bn_scale(rec.gamma, rec.var, rec.eps).astype(np.float64)
    c0 = fold_bias(s0, rec.beta, rec.mean).astype(np.float64)
    ok = np.abs(s0) > 1e-12
    return s0, c0, np.where(ok, 1 / np.where(ok, s0, 1.0), 0.0)


def sweep_rows(noisy, clean, source: tuple, folding: tuple, shrink: float) -> list:
    """One BN layer's state for the next frame.

    Args:
        noisy: the layer's noisy `Moments` before this frame (BN-input moments).
        clean: its clean `Moments` with this frame already added.
        source: (mean, var) of the source statistics, float64 per channel.
        folding: `source_fold` of the layer.
        shrink: the calibrator's pseudo-frames of the source statistics.

    Returns:
        (SWEEP_ROWS, channels) float32, the rows in `ROW_NAMES` order.
    """
    src_mean, src_var = source
    s0, c0, inv_s0 = folding
    share, spread, var_offset, noisy_mean = noisy.next_frame()
    w = (noisy.count + 1) / (noisy.count + 1 + shrink)
    clean_mean = w * clean.mean + (1 - w) * src_mean
    clean_var = w * clean.var + (1 - w) * src_var
    flat = clean_var <= 1e-12
    gain = w * share * inv_s0
    rows = np.empty((SWEEP_ROWS, len(src_mean)), np.float32)
    rows[:] = [gain, w * (1 - share) * noisy_mean + (1 - w) * src_mean - gain * c0, gain * inv_s0,
               w * spread * inv_s0 ** 2, c0 + s0 * noisy_mean, w * var_offset + (1 - w) * src_var,
               np.where(flat, 0.0, 1 / np.where(flat, 1.0, clean_var)), flat, src_mean - clean_mean]
    return rows


def identity_rows(mean, var) -> list:
    """The state whose estimate is the source statistics (mean, var): what the export writes."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    flat = var <= 1e-12
    zero = np.zeros_like(mean)
    rows = [zero, mean, zero, zero, zero, var, np.where(flat, 0.0, 1 / np.where(flat, 1.0, var)), flat * 1.0, zero]
    return [r.astype(np.float32) for r in rows]
