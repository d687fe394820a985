"""Workstation side: the paper's Algorithm 1 — re-estimate every BatchNorm's statistics under weight
noise, offline, at any batch size, on a Keras model.

Each batch runs with freshly drawn temporal noise (the chip's spatial noise fixed by the seed), in training
mode so that every BN normalises with the batch statistics as PyTorch's train mode does; the batch mean and
(unbiased) variance of each BN's input then update either an EMA with momentum m (Algorithm 1, starting
from the source statistics) or a cumulative average (AIMET `reestimate_bn_stats`, torch `update_bn`)."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from .moments import BatchStatsTracker
from .weights.assign import layer_kind


def noisy_layers(model) -> dict:
    """name -> (kind, Keras-layout kernel) of every conv/depthwise/dense layer: what noise applies to."""
    return {l.name: (layer_kind(l), np.asarray(l.weights[0].numpy()))
            for l in model.layers if layer_kind(l) in ("conv", "depthwise", "dense")}


def set_kernels(model, kernels: dict) -> None:
    for name, k in kernels.items():
        model.get_layer(name).weights[0].assign(k)


def bn_layers(model) -> list:
    return [l for l in model.layers if layer_kind(l) == "bn"]


def calibrate(model, batches: Iterable[np.ndarray], *, chip=None, estimator: str = "ema", momentum: float = 0.999,
              progress: Callable[[int], None] | None = None) -> dict:
    """Re-estimate BN statistics of `model` in place over `batches` (preprocessed NHWC float32 arrays).
    `chip` is an instantiated noise source (None: clean).  Returns {bn_name: (mean, var)}."""
    import keras

    bns = bn_layers(model)
    probe = keras.Model(model.inputs, [bn.input for bn in bns])
    clean = {n: k for n, (_, k) in noisy_layers(model).items()}
    trackers = {bn.name: BatchStatsTracker(bn.moving_mean.numpy(), bn.moving_variance.numpy(),
                                           estimator=estimator, momentum=momentum) for bn in bns}
    try:
        for i, batch in enumerate(batches):
            if chip is not None:
                set_kernels(model, chip.perturb(i))
            acts = probe(batch, training=True)
            for bn, a in zip(bns, acts if isinstance(acts, (list, tuple)) else [acts]):
                a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
                n = a.shape[0]
                var = a.var(axis=0) * (n / max(n - 1, 1))  # unbiased, as torch's running_var
                trackers[bn.name].update(a.mean(axis=0), var)
            if progress:
                progress(len(batch))
    finally:
        set_kernels(model, clean)
    stats = {}
    for bn in bns:
        mean, var = trackers[bn.name].mean, trackers[bn.name].var
        bn.moving_mean.assign(mean.astype(np.float32))
        bn.moving_variance.assign(var.astype(np.float32))
        stats[bn.name] = (mean, var)
    return stats
