"""Per-channel moment accumulators for BatchNorm statistics (device side: numpy only, float64).

`Moments` — streaming, at batch size 1: each frame contributes its per-channel E_frame[x] and
E_frame[x^2] (means over H, W).  The accumulated variance is the pooled one, E[x^2] - E[x]^2 over all
frames and positions, so it includes the between-frame variance of the frame means — what BN's
population variance is at batch size 1.  (Averaging per-frame variances would miss that part.)

`EMA` — offline, batches: Algorithm 1 of the paper, B <- m*B + (1-m)*x_batch for the batch mean and
variance, or (momentum=None) the cumulative average that AIMET's reestimate_bn_stats and torch's
update_bn compute; `BatchStatsTracker(mean, var, estimator, momentum)` builds one for a BN layer.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .validation import ArraySpec, Invalid, all_finite


class _State:
    """state_dict()/load_state_dict() over the attributes named in `_FIELDS` (plain numpy arrays)."""
    _FIELDS: tuple = ()

    def state_dict(self) -> dict:
        return {k: np.array(getattr(self, "_" + k), np.float64) for k in self._FIELDS}

    def load_state_dict(self, state: dict) -> None:
        for k in self._FIELDS:
            value = np.array(state[k], np.float64)
            setattr(self, "_" + k, value if value.ndim else float(value))


class Moments(_State):
    """Per-channel mean and variance of an activation, from per-frame moments.

    The first `window` frames (weighted count) are an exact cumulative average; after that each frame
    gets weight `weight / window` (an EMA with momentum 1 - 1/window) so the estimate tracks drift.
    Old weights always sum to 1, so there is no zero-start bias to correct (it is the bias-corrected
    EMA).  `window=None` never forgets.

    Internally: effective count n, mean, pooled central second moment c, average within-frame
    variance w and the sum of squared normalised frame weights k.  `var` adds the unbiasing term
    k/(1-k) * (c - w): with independent frames, E[var] is exactly the population variance (the pooled
    variance alone is low by Var(frame mean) * k, i.e. O(1/frames)).
    """
    _FIELDS = ("count", "n", "mean", "c", "w", "k")
    _PER_CHANNEL = ("mean", "c", "w")  # scalars 0.0 until the first frame, then one value per channel

    def __init__(self, window: Optional[float] = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 frame, not {window}")
        self.window = window
        self._count = self._n = self._k = 0.0
        self._mean = self._c = self._w = 0.0

    def _combine(self, n, mean, c, w, k, count) -> None:
        """Mix another accumulator's moments in; its share of the result is n / (n_self + n)."""
        total = self._n + n
        if total <= 0:
            return
        share = n / total
        delta = mean - self._mean
        self._c = (1 - share) * self._c + share * c + share * (1 - share) * delta**2
        self._mean = self._mean + share * delta
        self._w = (1 - share) * self._w + share * w
        self._k = (1 - share) ** 2 * self._k + share**2 * k
        self._n = total if self.window is None else min(total, self.window)
        self._count += count

    def _kept(self, weight: float) -> float:
        """The effective count kept when a frame of `weight` comes: with a window, forget just enough that
        the frame's share is weight/window."""
        return self._n if self.window is None else min(self._n, max(self.window - weight, 0.0))

    def update(self, mean, sqmean, weight: float = 1.0) -> None:
        """Add one frame: per-channel E_frame[x] and E_frame[x^2] (float arrays)."""
        mean = np.asarray(mean, np.float64)
        within = np.asarray(sqmean, np.float64) - mean**2
        self._n = self._kept(weight)
        self._combine(float(weight), mean, within, within, 1.0, float(weight))

    def next_frame(self, weight: float = 1.0) -> tuple:
        """How the next `update` of one frame moves the estimate, as coefficients: with m, v the frame's
        mean and within-frame variance and d = m - mean (the current mean), the updated `mean` is
        mean + share * d and the updated `var` is var_offset + share * v + spread * d^2 (before the clip
        at 0).  The sweep variant computes that in the graph (`runtime.sweep`).

        Returns:
            (share, spread, var_offset, mean): floats, and per-channel arrays (or 0.0 before any frame).
        """
        n = self._kept(weight)
        share = weight / (n + weight)
        k = (1 - share) ** 2 * self._k + share**2
        fix = k / (1 - k) if k < 1 - 1e-12 else 0.0
        var_offset = (1 - share) * ((1 + fix) * np.asarray(self._c) - fix * np.asarray(self._w))
        return share, (1 + fix) * share * (1 - share), var_offset, np.asarray(self._mean)

    @classmethod
    def state_specs(cls, channels: int) -> dict:
        """{field: ArraySpec} of `state_dict()` for an accumulator of `channels` channels."""
        return {k: ArraySpec("f", ((), (channels,)) if k in cls._PER_CHANNEL else ((),), (8,)) for k in cls._FIELDS}

    @classmethod
    def check_state(cls, state: dict, channels: int, where: str = "moments") -> None:
        """A saved accumulator can be resumed: the fields of `state_specs`, finite, count and n >= 0,
        0 <= k <= 1, and the per-channel fields all scalars (no frame yet) or all per channel."""
        values = {k: np.asarray(state[k]) for k in cls._FIELDS}
        if not all_finite(*values.values()):
            raise Invalid(f"{where}: not finite (NaN or Inf)")
        if values["count"] < 0 or values["n"] < 0 or not 0 <= values["k"] <= 1:
            raise Invalid(f"{where}: count {float(values['count'])}, n {float(values['n'])} or k "
                          f"{float(values['k'])} out of range")
        if len({values[k].shape for k in cls._PER_CHANNEL}) != 1 or (values["count"] > 0) != (values["mean"].ndim == 1):
            raise Invalid(f"{where}: mean, c and w are inconsistent with each other or with count")

    def merge(self, other: "Moments") -> None:
        """Pool `other` into self, weighting each by its effective count (equal to having accumulated
        all frames in one while the combined count stays within `window`)."""
        self._combine(other._n, other._mean, other._c, other._w, other._k, other._count)

    @property
    def count(self) -> float:
        """Total weight (frames) seen."""
        return self._count

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self._mean)

    @property
    def var(self) -> np.ndarray:
        """Population variance estimate (between-frame part included, unbiased for independent
        frames; the plain pooled variance after a single frame)."""
        between = np.asarray(self._c - self._w)
        fix = self._k / (1 - self._k) if self._k < 1 - 1e-12 else 0.0
        return np.maximum(self._c + fix * between, 0.0)


class EMA(_State):
    """Paper Algorithm 1 tracker of batch statistics: B <- m*B + (1-m)*x for the batch mean and batch
    variance.  `init=(mean, var)` starts from existing statistics (the paper's re-calibration of a
    trained BN); without it the average starts from zero and is bias-corrected (divided by 1 - m^t).
    `momentum=None`: cumulative average of all batches (torch `update_bn`, AIMET
    `reestimate_bn_stats`)."""
    _FIELDS = ("mean_sum", "var_sum", "norm", "count")

    def __init__(self, momentum: Optional[float] = 0.999, init=None):
        if momentum is not None and not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), not {momentum}")
        if momentum is None and init is not None:
            raise ValueError("the cumulative average does not start from existing statistics")
        self.momentum = momentum
        self._count = 0.0
        if init is None:
            self._mean_sum = self._var_sum = self._norm = 0.0
        else:
            self._mean_sum, self._var_sum = (np.array(x, np.float64) for x in init)
            self._norm = 1.0

    def update(self, mean, var) -> None:
        """Add one batch's per-channel mean and variance."""
        keep, add = (1.0, 1.0) if self.momentum is None else (self.momentum, 1 - self.momentum)
        self._mean_sum = keep * self._mean_sum + add * np.asarray(mean, np.float64)
        self._var_sum = keep * self._var_sum + add * np.asarray(var, np.float64)
        self._norm = keep * self._norm + add
        self._count += 1

    def merge(self, later: "EMA") -> None:
        """Fold in `later`, a tracker started empty (no `init`) on the batches that came after this one's:
        the state one tracker has after all of them, in that order.  The EMA weighs a batch by m^(batches
        after it), so this one's sums are scaled by m^(later's count) and order matters; the cumulative
        average (m = 1 here) just adds them."""
        if later.momentum != self.momentum:
            raise ValueError(f"cannot merge momentum {later.momentum} into {self.momentum}")
        keep = 1.0 if self.momentum is None else self.momentum ** later._count
        self._mean_sum = keep * self._mean_sum + later._mean_sum
        self._var_sum = keep * self._var_sum + later._var_sum
        self._norm = keep * self._norm + later._norm
        self._count += later._count

    @property
    def count(self) -> float:
        """Batches seen."""
        return self._count

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self._mean_sum / self._norm)

    @property
    def var(self) -> np.ndarray:
        return np.asarray(self._var_sum / self._norm)


def BatchStatsTracker(mean, var, estimator: str = "ema", momentum: float = 0.999) -> EMA:
    """Offline tracker for one BN layer (used by `edge_cbn.convert.offline_calibration`): `estimator="ema"` is
    Algorithm 1 starting from the layer's current statistics `(mean, var)`; `"cumulative"` ignores
    them and averages all batches equally (torch `update_bn` resets the statistics the same way)."""
    if estimator == "ema":
        return EMA(momentum, init=(mean, var))
    if estimator == "cumulative":
        return EMA(None)
    raise ValueError(f"unknown estimator {estimator!r}; expected 'ema' or 'cumulative'")
