"""How far apart two sets of BatchNorm statistics are: the one measure the checks use."""
from __future__ import annotations

import numpy as np


def relative_difference(got: dict, want: dict) -> float:
    """Largest difference between BN statistics {bn: (mean, var)} and `want`'s, relative to each layer's
    scale: a mean's to the layer's largest |mean| or standard deviation (a mean error matters against the
    spread that `(x - mean) / std` divides by), a variance's to the layer's largest variance.  A layer
    missing from `got`, or of another shape, is an infinite difference."""
    worst = 0.0
    for bn, (mean, var) in want.items():
        if bn not in got or np.shape(got[bn][0]) != np.shape(mean) or np.shape(got[bn][1]) != np.shape(var):
            return float("inf")
        mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
        scale = max(float(np.abs(mean).max()), float(np.sqrt(np.maximum(var, 0)).max()), 1e-12)
        worst = max(worst, float(np.abs(np.asarray(got[bn][0], np.float64) - mean).max()) / scale,
                    float(np.abs(np.asarray(got[bn][1], np.float64) - var).max()) / max(float(var.max()), 1e-12))
    return worst
