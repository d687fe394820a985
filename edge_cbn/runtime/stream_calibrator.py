"""Streaming Calibrated BatchNorm at batch size 1: BN input moments of calibration frames in, refolded
statistics out.  numpy only; `device_calibration.DeviceCalibration` runs the models that feed it.

Each calibration frame runs the calibration variant (`X.calib.tflite`), whose last output holds, per
folded BN, the per-channel spatial mean and mean of squares of the folded layer's output y.  With the
folding in force, y = s*z + c (s = gamma/sqrt(var+eps), c = beta - s*mean), so the moments of the BN input
z follow exactly, whatever statistics were folded in.  `Moments` accumulates them across frames (E[z] and
E[z^2]: the variance includes the between-frame variance, the unbiased estimator at batch size 1), as a
cumulative average over the first `window` frames, then a bias-corrected EMA.

Modes (`--mode`), because a camera sees one scene and absolute re-estimation pulls BN toward it:
- `absolute`: the paper's re-estimation, BN statistics = the noisy moments of the stream;
- `shift`: only the noise-induced change.  The clean model runs on the same frames; with the noise's
  effect on a channel modelled as affine, z_noisy = a*z_clean + b, var <- a^2 * source var and
  mean <- noisy mean + a * (source mean - clean mean), so the scene's own statistics cancel;
- `prior`: Schneider et al. 2020, mean/var <- (N*source + n*noisy)/(N + n) with prior strength N.

Schedule.  A layer's input moments depend on the statistics folded into every layer before it, so warm-up
goes depth first (Gauss-Seidel): the BN layers are split into `stages` consecutive groups; stage g
accumulates for `refold_every` frames with groups < g already refolded, then it is refolded together with
the refreshed estimates of the earlier groups.  After warm-up all layers are refolded every `track_every`
calibration frames, which tracks drift in small steps.  Why this schedule (the alternatives measured):
docs/RESULTS.md.

Sweep (`sweep=True`, `shift` mode): the same depth-first pass inside one invoke of the sweep variant
(`X.sweep.tflite`, `edge_cbn.convert.sweep`).  Before a frame, `sweep_state` writes for every BN the rows
that turn the frame's own moments into the estimate this calibrator hands out once the frame is added
(`runtime.sweep`), so each layer is measured under the layers before it already corrected by this frame;
`observe` then adds the frame to every layer and refolds them all.  The warm-up is `stages` such frames.

Nothing non-finite enters the statistics: a BN layer's moments of a frame that hold NaN or Inf are left
out (`dropped_frames` counts the frames that had any), an estimate that is not finite is not handed out
(the layer keeps its previous statistics; `rejected_estimates` counts them), and a saved state is checked
array by array before it is resumed (`load_state_dict`).
"""
from __future__ import annotations

import copy
import inspect

import numpy as np

from .fold import bn_scale
from .moments import Moments
from .sweep import source_fold, sweep_rows
from .validation import ArraySpec, Invalid, all_finite, check_arrays, check_bn_stats, check_count, stats_problem

MODES = ("shift", "absolute", "prior")
# `shift` mode's pseudo-frames of the source statistics.  Depth first, a layer's first frames come while the
# layers before it still move, and 4 keeps the estimate from following them; the sweep measures every layer
# under the layers before it already corrected, and 1 lets its first frames count (docs/RESULTS.md, "The sweep").
SHRINK, SWEEP_SHRINK = 4.0, 1.0


def shrink_for(shrink: float | None, sweep: bool) -> float:
    """`shrink`, or when it is None the schedule's default: `SWEEP_SHRINK` with the sweep, `SHRINK` depth first."""
    return (SWEEP_SHRINK if sweep else SHRINK) if shrink is None else shrink


def _f64(x, n, fill):
    return np.full(n, fill, np.float64) if x is None else np.asarray(x, np.float64)


class StreamCalibrator:
    """Calibrated BN statistics of `bundle` from the BN input moments of calibration frames, one frame at a
    time (modes and schedule: the module's docstring).

    Args:
        bundle: an exported `Bundle` whose sidecar names a calibration variant (meta "calibration").
        mode: "shift", "absolute" or "prior" (`MODES`).
        window: the moments' window in frames: a cumulative average over the first `window` frames, then an
            EMA with momentum 1 - 1/window; None: a cumulative average throughout.
        prior: `prior` mode: N, the weight of the source statistics in frames.
        refold_every: warm-up: calibration frames per stage.
        stages: warm-up stages, depth first (at most one per BN layer).
        shrink: `shift` mode: pseudo-frames of the source statistics mixed into the noisy and clean moments;
            None: `SHRINK` depth first, `SWEEP_SHRINK` with the sweep.
        track_every: after the warm-up, refold every N calibration frames.
        power: `shift` mode: the variance scale is (noisy var / clean var) ** power.
        sweep: every calibration frame calibrates every layer through the sweep variant (`sweep_state`);
            the warm-up is then `stages` calibration frames.

    Raises:
        ValueError: an unknown mode, no calibration variant in the meta, refold_every, stages or track_every
            below 1, a window below 1, or sweep in a mode other than `shift`.
    """

    def __init__(self, bundle, *, mode: str = "shift", window: float | None = 1024, prior: float = 16.0,
                 refold_every: int = 1, stages: int = 1000, shrink: float | None = None, track_every: int = 1,
                 power: float = 0.5, sweep: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown calibration mode {mode!r}; expected one of {MODES}")
        if "calibration" not in bundle.meta:
            raise ValueError("the model has no calibration variant: re-export it with tools/convert.py")
        if refold_every < 1 or stages < 1 or track_every < 1:
            raise ValueError("refold_every, stages and track_every must be >= 1")
        if sweep and mode != "shift":
            raise ValueError(f"the sweep calibrates in shift mode only, not {mode!r}")
        self.sweep = sweep
        self.mode, self.window, self.prior, self.power = mode, window, prior, power
        self.shrink = shrink_for(shrink, sweep)
        self.refold_every, self.track_every = refold_every, track_every
        self.bns = list(bundle.meta["calibration"]["bns"])
        # Stage boundaries over the BN layers (topological order), at most one stage per layer.
        self.stages = stages if sweep else min(stages, len(self.bns)) or 1
        self._bounds = [] if sweep else [round(len(self.bns) * (g + 1) / self.stages) for g in range(self.stages)]
        self.stage = 0  # groups < stage are refolded; == self.stages after warm-up
        self._since_refold = 0
        self._recs = {bn: bundle.layer(bn) for bn in self.bns}
        sizes = [len(self._recs[bn].mean) for bn in self.bns]
        self._splits = np.cumsum(sizes)[:-1]
        self._total = int(sum(sizes))
        self.source = {bn: (np.asarray(r.mean, np.float64), np.asarray(r.var, np.float64))
                       for bn, r in self._recs.items()}
        # Every layer's BN parameters end to end (`bn_input_moments` converts all layers at once).
        recs = [self._recs[bn] for bn in self.bns]
        self._gamma = np.concatenate([_f64(r.gamma, n, 1.0) for r, n in zip(recs, sizes)])
        self._beta = np.concatenate([_f64(r.beta, n, 0.0) for r, n in zip(recs, sizes)])
        self._eps = np.concatenate([np.full(n, r.eps, np.float64) for r, n in zip(recs, sizes)])
        self._source_mean = np.concatenate([self.source[bn][0] for bn in self.bns])
        self._source_square = np.concatenate([self.source[bn][1] + self.source[bn][0] ** 2 for bn in self.bns])
        self.applied = dict(self.source)  # what the last refold folded in
        self._source_folding = self._folding_of(self.source)  # the clean variant and the sweep always fold these
        self._folding = {bn: source_fold(r) for bn, r in self._recs.items()} if sweep else None
        self.noisy = {bn: Moments(window) for bn in self.bns}
        self.clean = {bn: Moments(window) for bn in self.bns} if mode == "shift" else None
        self.dropped_frames = 0      # calibration frames with non-finite moments (those layers left out)
        self.rejected_estimates = 0  # layer estimates that were not finite (previous statistics kept)

    @property
    def needs_clean(self) -> bool:
        """True when `observe` needs the clean model's moments too (`shift` mode)."""
        return self.clean is not None

    @property
    def warm(self) -> bool:
        """True once the warm-up is over (every BN layer has calibrated statistics)."""
        return self.stage >= self.stages

    @property
    def warmup_frames(self) -> int:
        """Calibration frames the warm-up takes: stages * refold_every."""
        return self.stages * self.refold_every

    @property
    def progress(self) -> float:
        """Warm-up progress 0..1 (1 once every layer has calibrated statistics)."""
        if self.warm:
            return 1.0
        return (self.stage * self.refold_every + self._since_refold) / self.warmup_frames

    def _done(self) -> list:
        """BN layers whose warm-up stage is over."""
        if self.warm or self.sweep:
            return self.bns
        return self.bns[: self._bounds[self.stage - 1]] if self.stage else []

    def _active(self) -> list:
        """BN layers whose moments are being accumulated now (warm-up: up to the current stage)."""
        return self.bns if self.warm or self.sweep else self.bns[: self._bounds[self.stage]]

    def bn_input_moments(self, vector: np.ndarray, stats: dict) -> dict:
        """{bn: (E[z], E[z^2])} of each BN's input from the variant's moments output `vector`, given the
        statistics {bn: (mean, var)} folded into the model that produced it.  Non-finite values pass
        through quietly (no numpy warning on the device's stderr): `observe` leaves them out.

        Args:
            vector: the variant's moments output, (1, 2C) or flat, C the BN channels of all layers: every
                BN's per-channel means, then every BN's means of squares, in the order of `bns`.
            stats: {bn name: (mean, var)} folded into the model that produced `vector`.

        Returns:
            {bn name: (E[z], E[z^2])}, float64 arrays of one value per channel.

        Raises:
            ValueError: `vector` does not hold 2C values.
        """
        v = np.asarray(vector, np.float64).reshape(-1)
        if v.size != 2 * self._total:
            raise ValueError(f"moments output has {v.size} values, expected {2 * self._total}")
        c, inv, ok = self._source_folding if stats is self.source else self._folding_of(stats)
        m_y, sq_y = v[: self._total], v[self._total:]
        with np.errstate(all="ignore"):  # every layer at once: one value per channel of all BN layers
            m_z = np.where(ok, (m_y - c) * inv, self._source_mean)
            sq_z = np.where(ok, (sq_y - 2 * c * m_y + c * c) * inv * inv, self._source_square)
        return dict(zip(self.bns, zip(np.split(m_z, self._splits), np.split(sq_z, self._splits))))

    def _folding_of(self, stats: dict) -> tuple:
        """(c, 1/s or 0, s != 0) of every BN channel end to end, for the statistics {bn: (mean, var)} folded
        in: y = s*z + c."""
        mean, var = (np.concatenate([np.asarray(stats[bn][k], np.float64) for bn in self.bns]) for k in (0, 1))
        with np.errstate(all="ignore"):
            s = bn_scale(self._gamma, var, self._eps).astype(np.float64)
            ok = np.abs(s) > 1e-12  # gamma == 0: the BN output ignores its input; keep the source stats
            return self._beta - s * mean, np.where(ok, 1.0 / np.where(ok, s, 1.0), 0.0), ok

    def sweep_state(self, clean_vector) -> dict:
        """The sweep variant's state for the next calibration frame (`runtime.sweep.sweep_rows`), given the
        clean model's moments on that frame (the source statistics folded in).  Nothing is accumulated here:
        `observe` adds the frame.

        Args:
            clean_vector: the clean calibration variant's moments output on the frame (`bn_input_moments`).

        Returns:
            {bn name: (SWEEP_ROWS, channels) float32}; a layer whose clean moments are not finite gets the rows of
            its current accumulators without them.

        Raises:
            ValueError: not a sweep calibrator, or a moments vector of the wrong size.
        """
        if not self.sweep:
            raise ValueError("sweep_state needs a calibrator made with sweep=True")
        clean = self.bn_input_moments(clean_vector, self.source)
        finite = all_finite(clean_vector)
        state = {}
        for bn in self.bns:
            after = copy.copy(self.clean[bn])  # `update` replaces its arrays, never writes into them
            if finite or all_finite(*clean[bn]):
                after.update(*clean[bn])
            state[bn] = sweep_rows(self.noisy[bn], after, self.source[bn], self._folding[bn], self.shrink)
        return state

    def observe(self, noisy_vector, noisy_stats, clean_vector=None, clean_stats=None) -> dict | None:
        """One calibration frame: the noisy model's moments output (and, in `shift` mode, the clean
        model's on the same frame) with the statistics each had folded in.  Returns the statistics to
        refold when a refold is due, else None.

        Args:
            noisy_vector: the noisy model's moments output on this frame (`bn_input_moments`).
            noisy_stats: {bn name: (mean, var)} folded into the noisy model.
            clean_vector: `shift` mode: the clean model's moments output on the same frame; else unused.
            clean_stats: `shift` mode: {bn name: (mean, var)} folded into the clean model.

        Returns:
            `statistics()` when this frame completes a refold, else None.

        Raises:
            ValueError: `shift` mode without `clean_vector`, or a moments vector of the wrong size.
        """
        if self.clean is not None and clean_vector is None:
            raise ValueError("shift mode needs the clean model's moments on the same frame")
        if not self._accumulate(noisy_vector, noisy_stats, clean_vector, clean_stats):
            return None  # nothing usable on this frame: it does not count towards a refold
        self._since_refold += 1
        if self._since_refold < (self.track_every if self.warm else self.refold_every):
            return None
        self._since_refold = 0
        if not self.warm:
            self.stage += 1
        for bn in self._done():
            self._apply(bn, *self.estimate(bn))
        return self.statistics()

    def _accumulate(self, noisy_vector, noisy_stats, clean_vector, clean_stats) -> bool:
        """Add one frame's moments for the active BN layers, leaving out a layer whose moments (noisy or,
        in shift mode, clean: they pair up) are not finite.  False when every layer was left out."""
        active = self._active()
        noisy = self.bn_input_moments(noisy_vector, noisy_stats)
        clean = self.bn_input_moments(clean_vector, clean_stats) if self.clean is not None else None
        finite = all_finite(noisy_vector, *(() if clean_vector is None else (clean_vector,)))
        kept = 0
        for bn in active:
            if not (finite or all_finite(*noisy[bn], *(clean[bn] if clean else ()))):
                continue
            self.noisy[bn].update(*noisy[bn])
            if clean is not None:
                self.clean[bn].update(*clean[bn])
            kept += 1
        if kept < len(active):
            self.dropped_frames += 1
        return kept > 0

    def _apply(self, bn: str, mean, var) -> None:
        """Hand out a new estimate only when it can be folded (finite, var >= 0, one value per channel)."""
        if stats_problem(mean, var, len(self.source[bn][0])) is None:
            self.applied[bn] = (mean, var)
        else:
            self.rejected_estimates += 1

    def statistics(self) -> dict:
        """The calibrated statistics {bn: (mean, var)} as of the last refold (float32; the source
        statistics for layers the warm-up has not reached).

        Returns:
            {bn name: (mean, var)}, float32 arrays of one value per channel.
        """
        return {bn: (np.asarray(m, np.float32), np.asarray(v, np.float32)) for bn, (m, v) in self.applied.items()}

    def estimate(self, bn: str) -> tuple:
        """The current estimate of one BN layer's statistics from its accumulated moments.

        Args:
            bn: the name of one of the variant's BN layers (`bns`).

        Returns:
            (mean, var), float32 arrays of one value per channel, var clipped at 0; the source statistics
            before any frame.

        Raises:
            KeyError: `bn` is not one of `bns`.
        """
        src_mean, src_var = self.source[bn]
        noisy = self.noisy[bn]
        if noisy.count == 0:
            mean, var = src_mean, src_var
        elif self.mode == "absolute":
            mean, var = noisy.mean, noisy.var
        elif self.mode == "prior":
            w = noisy.count / (noisy.count + self.prior)
            mean, var = (1 - w) * src_mean + w * noisy.mean, (1 - w) * src_var + w * noisy.var
        else:
            # Few frames (one scene) pin a channel's moments badly: `shrink` pseudo-frames of the
            # source statistics in both the noisy and the clean moments keep the ratio sane.
            w = noisy.count / (noisy.count + self.shrink)
            clean = self.clean[bn]
            e_n, e_c = (w * m + (1 - w) * src_mean for m in (noisy.mean, clean.mean))
            v_n, v_c = (w * v + (1 - w) * src_var for v in (noisy.var, clean.var))
            ratio = np.where(v_c > 1e-12, v_n / np.maximum(v_c, 1e-12), 1.0)
            a = ratio ** self.power
            mean, var = e_n + a * (src_mean - e_c), src_var * a * a
        return np.asarray(mean, np.float32), np.maximum(np.asarray(var, np.float32), 0.0)

    def state_dict(self) -> dict:
        """Plain numpy arrays: what `--state` saves.

        Returns:
            {key: numpy array}: the mode, counters, statistics handed out and moments accumulators (keys and
            layouts: `state_specs`).
        """
        state = {"mode": np.array(self.mode), "stage": np.array(self.stage),
                 "since_refold": np.array(self._since_refold), "dropped_frames": np.array(self.dropped_frames),
                 "rejected_estimates": np.array(self.rejected_estimates)}
        for bn, (m, v) in self.applied.items():
            state[f"applied/{bn}/mean"], state[f"applied/{bn}/var"] = m, v
        for prefix, accs in self._accumulators():
            for bn, acc in accs.items():
                for k, v in acc.state_dict().items():
                    state[f"{prefix}/{bn}/{k}"] = v
        return state

    def _accumulators(self):
        return (("noisy", self.noisy), ("clean", self.clean)) if self.clean is not None else (("noisy", self.noisy),)

    def state_specs(self) -> dict:
        """{key: validation.ArraySpec} of `state_dict()`: what a saved state must hold, array by array (the
        two counters are optional: states saved before they existed load with 0).

        Returns:
            {key: `validation.ArraySpec`} (dtype kind, allowed shapes, optional).
        """
        integer = ArraySpec("iu", ((),))
        # "since_refuse": the counter's name in states saved before "refold" became the one word for it.
        counter = ArraySpec("iu", ((),), optional=True)
        specs = {"mode": ArraySpec("U", ((),)), "stage": integer, "since_refold": counter, "since_refuse": counter,
                 "dropped_frames": ArraySpec("iu", ((),), optional=True),
                 "rejected_estimates": ArraySpec("iu", ((),), optional=True)}
        for bn in self.bns:
            channels = (len(self.source[bn][0]),)
            specs[f"applied/{bn}/mean"] = specs[f"applied/{bn}/var"] = ArraySpec("f", (channels,))
            for prefix, _ in self._accumulators():
                specs.update({f"{prefix}/{bn}/{k}": spec for k, spec in Moments.state_specs(channels[0]).items()})
        return specs

    def check_state_dict(self, state: dict) -> None:
        """`Invalid` unless `state` is a `state_dict()` of this calibrator's BN layers and mode: every array
        present with its dtype and shape, the statistics foldable, the accumulators finite and consistent
        (in shift mode, a layer's noisy and clean moments count the same frames).

        Args:
            state: {key: array}, e.g. read from a saved state file.

        Raises:
            Invalid: the first thing found wrong (another mode, a missing, unexpected or malformed array, a
                stage beyond the warm-up, statistics that cannot be folded, inconsistent accumulators).
        """
        if "mode" in state and str(state["mode"]) != self.mode:
            raise Invalid(f"saved calibration state is for mode {state['mode']}, not {self.mode}")
        check_arrays(state, self.state_specs())
        if "since_refold" not in state and "since_refuse" not in state:
            raise Invalid("array 'since_refold' is missing")
        if check_count("stage", state["stage"]) > self.stages:
            raise Invalid(f"saved stage {int(state['stage'])} beyond the {self.stages} warm-up stages")
        for key in ("since_refold", "dropped_frames", "rejected_estimates"):
            check_count(key, state.get(key, np.array(0)))
        for bn in self.bns:
            check_bn_stats(bn, state[f"applied/{bn}/mean"], state[f"applied/{bn}/var"])
            for prefix, _ in self._accumulators():
                Moments.check_state({k: state[f"{prefix}/{bn}/{k}"] for k in Moments._FIELDS},
                                    len(self.source[bn][0]), f"{prefix} moments of BN {bn!r}")
            if self.clean is not None and state[f"noisy/{bn}/count"] != state[f"clean/{bn}/count"]:
                raise Invalid(f"BN {bn!r}: noisy and clean moments count different frames")

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` after `check_state_dict`; all or nothing (a bad state raises `Invalid`
        and leaves the calibrator as it was).

        Args:
            state: {key: array}, a `state_dict()` of a calibrator of the same BN layers and mode.

        Raises:
            Invalid: `state` fails `check_state_dict`.
        """
        self.check_state_dict(state)
        applied = {bn: (np.asarray(state[f"applied/{bn}/mean"], np.float32),
                        np.asarray(state[f"applied/{bn}/var"], np.float32)) for bn in self.bns}
        loaded = {}
        for prefix, accs in self._accumulators():
            loaded[prefix] = {}
            for bn in accs:
                acc = loaded[prefix][bn] = Moments(self.window)
                acc.load_state_dict({k: state[f"{prefix}/{bn}/{k}"] for k in acc._FIELDS})
        since = state.get("since_refold", state.get("since_refuse"))
        self.stage, self._since_refold, self.applied = int(state["stage"]), int(since), applied
        self.dropped_frames = int(state.get("dropped_frames", 0))
        self.rejected_estimates = int(state.get("rejected_estimates", 0))
        self.noisy = loaded["noisy"]
        if self.clean is not None:
            self.clean = loaded["clean"]


# The constructor's defaults, which the `stream` and `evaluate` options show and use.
DEFAULTS = {k: p.default for k, p in inspect.signature(StreamCalibrator).parameters.items()
            if p.default is not inspect.Parameter.empty}
