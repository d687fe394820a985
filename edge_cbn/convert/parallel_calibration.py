"""`tools/convert.py --calibrate DIR --workers N | --ray ADDRESS`: Algorithm 1 with its batches spread over
worker processes or a Ray cluster (`edge_cbn.cluster`), merged into the statistics one process computes.

A unit is a run of consecutive whole batches.  A batch is never split: in train mode every BN normalises
with the statistics of the batch it is given, so which images share a batch is part of the result.  Each
batch gets the noise draw of its index in the calibration (`chip.perturb(batch index)`), as in one process.
A worker receives the model as its architecture (Keras JSON) and weight arrays, never a TensorFlow object,
and returns its trackers, started empty, as state dicts; the driver folds them in batch order into the
trackers that start from the model's own statistics (`runtime.moments.EMA.merge`):

- cumulative (the default): the plain average of the batches' means and variances, so the runs' sums and
  counts add and their order does not matter: the same statistics as one process to float64 rounding;
- EMA (Algorithm 1, momentum m): a batch weighs m^(batches after it), so the estimate depends on the
  order of the batches.  Folded in batch order, as here, it is again the one-process estimate; folded in
  the order the runs happen to finish it would be the EMA of a different sequence, a different result.
Within a batch, `--micro-batch` still merges pieces with Chan et al.'s pairwise update (`batch_moments`):
those are pooled moments of one batch; across batches the estimator averages per-batch statistics."""
from __future__ import annotations

import dataclasses
import hashlib
import math

from ..cluster import shared
from ..runtime.moments import EMA, BatchStatsTracker
from ..runtime.noise import make_noise
from .batch_moments import BatchMoments
from .model_transfer import model_from_spec, model_spec
from .offline_calibration import accumulate_bn, bn_layers, image_batches, keras_noise_targets, set_bn_statistics

MAX_UNITS = 64  # runs of batches per calibration: enough to spread, few enough that each is worth a round trip


@dataclasses.dataclass(frozen=True)
class CalibrationPayload:
    """What every worker of one calibration receives once."""
    key: str
    keras: tuple  # (architecture JSON, weight arrays)
    files: tuple  # the calibration images, in order (paths)
    preprocess: dict
    input_size: tuple  # (H, W)
    batch_size: int
    micro_batch: int | None
    noise: str
    eta: float
    seed: int
    noise_options: dict
    estimator: str
    momentum: float
    noise_layers: tuple | None = None  # the noise targets (None: every weight layer)


@dataclasses.dataclass(frozen=True)
class BatchRun:
    start: int  # index of the first batch
    stop: int

    def __str__(self):
        return f"calibration batches {self.start}-{self.stop - 1}"


def empty_tracker(estimator: str, momentum: float) -> EMA:
    """A tracker of a later run of batches: no starting statistics (they are the first run's)."""
    return EMA(None if estimator == "cumulative" else momentum)


def run_batches(payload: CalibrationPayload, run: BatchRun) -> dict:
    """A worker's unit: {bn name: tracker state} over the run's batches."""
    model = shared.memo("keras", payload.key, lambda: model_from_spec(payload.keras))
    moments = shared.memo("moments", payload.key, lambda: batch_moments(model))
    chip = shared.memo("chip", payload.key, lambda: noise_chip(payload, model))
    size = payload.batch_size
    files = list(payload.files[run.start * size:run.stop * size])
    trackers = {bn.name: empty_tracker(payload.estimator, payload.momentum) for bn in moments.bns}
    accumulate_bn(model, moments, image_batches(files, payload.preprocess, payload.input_size, size), trackers,
                  chip=chip, batch0=run.start, micro_batch=payload.micro_batch)
    return {name: tracker.state_dict() for name, tracker in trackers.items()}


def batch_moments(model):
    return BatchMoments(model, bn_layers(model))


def noise_chip(payload: CalibrationPayload, model):
    """The chip over the model's clean kernels (None: no noise), as one process instantiates it."""
    if payload.noise == "none":
        return None
    return make_noise(payload.noise, payload.eta, payload.seed, **payload.noise_options).instantiate(
        keras_noise_targets(model, payload.noise_layers))


def batch_runs(batches: int, max_units: int = MAX_UNITS) -> list[BatchRun]:
    """Consecutive runs of whole batches covering `batches`, at most `max_units` of them."""
    per = max(1, math.ceil(batches / max_units))
    return [BatchRun(start, min(start + per, batches)) for start in range(0, batches, per)]


def calibrate_in_parallel(model, files, pool, *, preprocess: dict, noise="none", eta=0.0, seed=0, batch_size=32,
                          micro_batch=None, momentum=0.999, estimator="cumulative", noise_options=None,
                          progress=None, max_units: int = MAX_UNITS, noise_layers=None) -> dict:
    """Algorithm 1 over the image `files` on `pool` (`cluster.make_pool`), in place on `model`, merged in
    batch order: the statistics `offline_calibration.calibrate_on_images` computes in one process.

    Args:
        model: the Keras model (sent to the workers as architecture JSON and weight arrays).
        files: the calibration images, in order.
        pool: a `LocalPool` or `RayPool`.
        preprocess: the model's preprocessing (`{"mean", "std", "letterbox"}`).
        noise, eta, seed, noise_options: the chip (`make_noise`), drawn per batch index.
        noise_layers: the names of the layers noise acts on (None: every weight layer).
        batch_size: images per calibration batch (the paper's batch size).
        micro_batch: run a batch in pieces of this many images (exact).
        momentum, estimator: as for `calibrate_bn`.
        progress: optional callable, given the number of batches done.
        max_units: at most this many units of work (batches are grouped into runs).

    Returns:
        {bn name: (mean, var)}, what the model's BN layers now hold.

    Raises:
        BadInput: an unreadable calibration image.
        WorkerDied: a unit's worker died more often than the pool's retries allow.
    """
    spec = model_spec(model)
    key = hashlib.sha1(spec[0].encode())
    for w in spec[1]:
        key.update(w.tobytes())
    key.update(repr((list(map(str, files)), preprocess, batch_size, micro_batch, noise, eta, seed, noise_options,
                     estimator, momentum, noise_layers)).encode())
    payload = CalibrationPayload(key.hexdigest(), spec, tuple(map(str, files)), dict(preprocess),
                                 tuple(model.input_shape[1:3]), batch_size, micro_batch, noise, float(eta), int(seed),
                                 dict(noise_options or {}), estimator, momentum,
                                 None if noise_layers is None else tuple(noise_layers))
    states = {}

    def on_done(run: BatchRun, state: dict):
        states[run.start] = state
        if progress:
            progress(len(files[run.start * batch_size:run.stop * batch_size]))

    pool.run(run_batches, payload, batch_runs(math.ceil(len(files) / batch_size), max_units), on_done)
    trackers = {bn.name: BatchStatsTracker(bn.moving_mean.numpy(), bn.moving_variance.numpy(), estimator=estimator,
                                           momentum=momentum) for bn in bn_layers(model)}
    for start in sorted(states):  # batch order: the EMA depends on it
        for name, tracker in trackers.items():
            later = empty_tracker(estimator, momentum)
            later.load_state_dict(states[start][name])
            tracker.merge(later)
    return set_bn_statistics(model, trackers)
