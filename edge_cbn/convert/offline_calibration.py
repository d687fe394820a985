"""Offline calibration, the paper's Algorithm 1 on the workstation: re-estimate every BatchNorm's
statistics of a Keras model under weight noise, at any batch size.

Each batch runs with freshly drawn temporal noise (the chip's spatial noise fixed by the seed), in training
mode so that every BN normalises with the batch statistics as PyTorch's train mode does; the batch mean and
(unbiased) variance of each BN's input (reduced inside TensorFlow, `batch_moments`) then update either an
EMA with momentum m (Algorithm 1, starting from the source statistics) or a cumulative average (AIMET
`reestimate_bn_stats`, torch `update_bn`).  Images decode and noise is drawn for the next batch while
the current one runs."""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from ..runtime.fold import WEIGHT_KINDS
from ..runtime.moments import BatchStatsTracker
from ..runtime.noise import make_noise
from ..runtime.processing import normalise
from ..runtime.images import read_image
from .batch_moments import BatchMoments, batch_moments_of
from .weights.assign import layer_kind

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def keras_noise_targets(model, chosen=None) -> dict:
    """{name: (kind, Keras-layout kernel)} of every conv/depthwise/dense/transposed-conv layer of a Keras
    model, or of those named in `chosen`: what noise applies to, the argument of `Noise.instantiate`
    (`runtime.noise_targets` for a bundle)."""
    return {l.name: (layer_kind(l), np.asarray(l.weights[0].numpy())) for l in model.layers
            if layer_kind(l) in WEIGHT_KINDS and (chosen is None or l.name in chosen)}


def set_kernels(model, kernels: dict) -> None:
    for name, k in kernels.items():
        model.get_layer(name).weights[0].assign(k)


def bn_layers(model) -> list:
    return [l for l in model.layers if layer_kind(l) == "bn"]


def calibrate_bn(model, batches: Iterable[np.ndarray], *, chip=None, estimator: str = "ema", momentum: float = 0.999,
                 progress: Callable[[int], None] | None = None, micro_batch: int | None = None) -> dict:
    """The paper's Algorithm 1: re-estimate the BN statistics of `model` in place over `batches`.

    Args:
        model: a Keras model with BatchNormalization layers (its kernels are clean again afterwards).
        batches: preprocessed NHWC float32 arrays, one calibration batch each.
        chip: an instantiated noise source (None: clean), drawn afresh per batch (the batch index).
        estimator: "ema" (BN's own running average, `momentum`) or "cumulative" (the mean over batches).
        momentum: the EMA's momentum.
        progress: optional callable, given the number of batches done after each one.
        micro_batch: run larger batches in pieces of this many images (exact: `batch_moments`).

    Returns:
        {bn name: (mean, var)}, what the model's BN layers now hold.

    Raises:
        ValueError: an unknown estimator.
    """
    bns = bn_layers(model)
    trackers = {bn.name: BatchStatsTracker(bn.moving_mean.numpy(), bn.moving_variance.numpy(),
                                           estimator=estimator, momentum=momentum) for bn in bns}
    accumulate_bn(model, batch_moments_of(model, bns), batches, trackers, chip=chip, progress=progress,
                  micro_batch=micro_batch)
    return set_bn_statistics(model, trackers)


def accumulate_bn(model, moments: BatchMoments, batches: Iterable[np.ndarray], trackers: dict, *, chip=None,
                  batch0: int = 0, progress=None, micro_batch: int | None = None) -> None:
    """Each batch's BN input statistics into `trackers` ({bn name: `EMA`}), the first batch being batch
    number `batch0` of the calibration (its noise draw), under `chip`; the model's kernels are clean after."""
    clean = {n: k for n, (_, k) in keras_noise_targets(model).items()}
    noisy_batches = ((batch, None if chip is None else chip.perturb(batch0 + i)) for i, batch in enumerate(batches))
    try:
        for batch, kernels in prefetched(noisy_batches):  # the next batch decodes and draws its noise meanwhile
            if kernels is not None:
                set_kernels(model, kernels)
            if micro_batch and len(batch) > micro_batch:
                stats = moments.exact_in_micro_batches(batch, micro_batch)
            else:
                stats = moments(batch)
            for bn, m in zip(moments.bns, stats):
                trackers[bn.name].update(m.mean, m.var)
            if progress:
                progress(len(batch))
            del batch, kernels  # so that the prefetcher may make the next ones in their place
    finally:
        set_kernels(model, clean)


def set_bn_statistics(model, trackers: dict) -> dict:
    """The trackers' statistics into the model's BN layers; {bn name: (mean, var)}."""
    stats = {}
    for bn in bn_layers(model):
        mean, var = trackers[bn.name].mean, trackers[bn.name].var
        bn.moving_mean.assign(mean.astype(np.float32))
        bn.moving_variance.assign(var.astype(np.float32))
        stats[bn.name] = (mean, var)
    return stats


def prefetched(items: Iterable, depth: int = 1):
    """Iterate `items` while a background thread produces the next `depth` of them (image decoding and
    numpy noise draws release the GIL, so they overlap TensorFlow's forward pass).  An item is made only
    when fewer than `depth` + 1 are alive (the consumer's, once it asks for the next, counts as done; it
    should drop its reference by then), which bounds memory: a batch and its noisy kernels each.  An
    exception in the producer is raised here, in order."""
    q: queue.Queue = queue.Queue()
    slots = threading.Semaphore(depth + 1)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for item in _when_free(iter(items), slots, stop):
                q.put((item, None))
            q.put((end, None))
        except BaseException as e:  # handed to the consumer, raised there
            q.put((end, e))

    threading.Thread(target=produce, name="edge-cbn-prefetch", daemon=True).start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
            del item
            slots.release()  # the consumer asks for the next one: it is done with this one
    finally:
        stop.set()
        slots.release()


def _when_free(iterator, slots, stop):
    """The items of `iterator`, each made only once `slots` has a free slot (and never after `stop`)."""
    while True:
        while not slots.acquire(timeout=0.1):
            if stop.is_set():
                return
        if stop.is_set():
            return
        try:
            yield next(iterator)
        except StopIteration:
            return


def offline_statistics(keras_model, preset, eta, seed, inputs, *, estimator, batch_size=32, momentum=0.999,
                       noise_options=None) -> dict:
    """Algorithm 1 over `inputs` (normalised NHWC float32) under a fresh chip, in batches of `batch_size`;
    {bn: (mean, var)}.  The model is left as it came."""
    source = {l.name: [w.numpy().copy() for w in l.weights] for l in keras_model.layers if l.weights}
    chip = make_noise(preset, eta, seed, **(noise_options or {})).instantiate(keras_noise_targets(keras_model))
    batches = (inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size))
    try:
        return calibrate_bn(keras_model, batches, chip=chip, estimator=estimator, momentum=momentum)
    finally:
        for layer in keras_model.layers:
            if layer.weights:
                layer.set_weights(source[layer.name])


def image_files(directory, max_images=None) -> list[Path]:
    """The images in `directory` (recursively, sorted); ValueError when there are none."""
    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return files


def image_batches(files, preprocess: dict, input_size, batch_size: int):
    """Batches of normalised NHWC float32 images, resized (squashed) to the model input (`input_size`: a
    side or (H, W)) as the runtime does; an unreadable image is an OSError naming it."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size

    def load(path):
        bgr = read_image(path)  # a regular file, within the pixel bound
        if bgr is None:
            raise OSError(f"cannot read image {path}")
        rgb = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (w, h),
                         interpolation=cv2.INTER_AREA)
        return normalise(rgb, preprocess)

    for i in range(0, len(files), batch_size):
        yield np.stack([load(f) for f in files[i:i + batch_size]])


def calibrate_on_images(spec, model, files, *, noise="none", eta=0.0, seed=0, batch_size=32, micro_batch=None,
                        momentum=0.999, estimator="cumulative", noise_options=None, progress=None,
                        noise_layers=None) -> dict:
    """Algorithm 1 over the image `files` (see `image_files`) under the given noise on the layers
    `noise_layers` names (None: every weight layer), in place on `model` (the registered model `spec` says
    how to preprocess); {bn: (mean, var)}."""
    chip = None if noise == "none" else make_noise(noise, eta, seed, **(noise_options or {})).instantiate(
        keras_noise_targets(model, noise_layers))
    batches = image_batches(files, spec.preprocess, tuple(model.input_shape[1:3]), batch_size)
    return calibrate_bn(model, batches, chip=chip, estimator=estimator, momentum=momentum, progress=progress,
                        micro_batch=micro_batch)
