"""How far the served prediction agrees with the clean model's, on sampled frames: the stream's own
measure of what calibration recovers (`--agreement-every`)."""
from __future__ import annotations

import collections
import contextlib
import math

import numpy as np

from ..runtime.detection import box_iou
from ..runtime.noisy_model import NoisyModel
from ..runtime.processing import flat_outputs

MAX_SAMPLES = 10000
AGREEMENT_METRICS = {"classification": "top1_agreement", "detection": "box_f1_iou50",
                     "segmentation": "pixel_agreement", "raw": "cosine_similarity"}


def cosine_similarity(reference: np.ndarray, other: np.ndarray) -> float:
    """Cosine similarity of two vectors in %, float64: 100 the same direction, 0 orthogonal, -100 opposite.

    Args:
        reference: the clean model's outputs as one vector (`processing.flat_outputs`).
        other: the other model's, the same length.

    Returns:
        The similarity in [-100, 100], exactly 100 for equal vectors: 100 when both are zero (the same
        output), 0 when only one is or either holds a NaN or Inf (a broken output agrees with nothing,
        and the means stay numbers).

    Raises:
        ValueError: the vectors differ in length.
    """
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"outputs of {a.size} and {b.size} values cannot be compared")
    aa, bb = float(a @ a), float(b @ b)
    if not math.isfinite(aa + bb):
        return 0.0
    if aa == 0 or bb == 0:
        return 100.0 if aa == bb else 0.0
    # One square root of the product: sqrt(x * x) == x in binary floating point, so a == b gives 100
    # exactly (norm(a) * norm(b) can miss by an ulp); float32 outputs cannot overflow the product.
    return float(np.clip(float(a @ b) / math.sqrt(aa * bb), -1.0, 1.0) * 100)


def output_norm(pred) -> float | None:
    """A raw prediction's size: the L2 norm of its outputs, flattened and concatenated.

    Args:
        pred: a raw model's prediction, its output arrays (`Processor.postprocess`).

    Returns:
        The norm, or None when it is not finite (NaN or Inf: the log stays valid JSON).
    """
    norm = float(np.linalg.norm(flat_outputs(pred)))
    return norm if math.isfinite(norm) else None


def agreement(task: str, reference, other) -> float:
    """Agreement (%) of a prediction with the clean model's on one frame: classification top-1 equality;
    detection F1 of greedy one-to-one matches (same class, IoU >= 0.5), 100 when both find nothing;
    segmentation pixel agreement of the class masks; raw the cosine similarity of the outputs, flattened
    and concatenated (`cosine_similarity`).

    Args:
        task: the bundle's task (`AGREEMENT_METRICS` names each one's measure).
        reference: the clean model's prediction (`Processor.postprocess`).
        other: the noisy or served model's prediction on the same frame.

    Returns:
        The agreement in % (raw: in [-100, 100], the others in [0, 100]).
    """
    if task == "classification":
        return 100.0 if reference[0][0] == other[0][0] else 0.0
    if task == "segmentation":
        return float(np.mean(np.asarray(reference) == np.asarray(other)) * 100)
    if task == "raw":
        return cosine_similarity(flat_outputs(reference), flat_outputs(other))
    if not reference and not other:
        return 100.0
    free = list(other)
    matched = 0
    for cls, _, _, box in sorted(reference, key=lambda d: -d[2]):
        same = [j for j, o in enumerate(free) if o[0] == cls]
        if not same:
            continue
        ious = box_iou(np.float32(box), np.float32([free[j][3] for j in same]))
        best = int(np.argmax(ious))
        if ious[best] >= 0.5:
            matched += 1
            free.pop(same[best])
    return 200.0 * matched / (len(reference) + len(other))


def short_prediction(task: str, pred):
    """A prediction as recorded in the log's agreement samples.

    Args:
        task: the bundle's task.
        pred: its prediction (`Processor.postprocess`).

    Returns:
        Something small for JSON: classification the top-1 label, detection the number of boxes,
        segmentation the classes present, raw the outputs' L2 norm rounded to 4 decimals (None if not finite).
    """
    if task == "classification":
        return pred[0][1]
    if task == "detection":
        return len(pred)
    if task == "raw":
        norm = output_norm(pred)
        return None if norm is None else round(norm, 4)
    return sorted(int(c) for c in np.unique(pred) if c)


class AgreementSampler:
    """On every `every`-th frame, the clean model and the noisy model that is never refolded run on the
    frame too; the served prediction's agreement with the clean one is recorded before (uncalibrated)
    and after (served) calibration."""

    def __init__(self, bundle, chip, processor, *, every: int, num_threads=None, seed: int = 0,
                 clean_variant=None, lock=None):
        self.proc, self.task, self.every = processor, processor.task, every
        # The clean calibration variant, when the stream already runs one, gives the clean model's outputs
        # (bit for bit; its extra last output is dropped) without a third copy of the model.
        self.clean = clean_variant or NoisyModel(bundle, None, num_threads=num_threads)
        self._drop_last = clean_variant is not None
        self._lock = lock or contextlib.nullcontext()  # held for the sample (the calibration worker's too)
        # Exact temporal noise, built for each sampled frame and dropped after it: noise states would keep
        # --noise-states interpreters alive (Lite0: ~175 MB) for a pass that runs on one frame in `every`.
        self.uncalibrated = NoisyModel(bundle, chip, num_threads=num_threads, noise_states=0, seed=seed)
        # (frame, before, after) of the latest samples: bounded, the service runs for weeks.
        self.samples: collections.deque = collections.deque(maxlen=MAX_SAMPLES)

    def due(self, i: int) -> bool:
        return (i + 1) % self.every == 0

    def sample(self, x, ctx, frame: int, i: int, served) -> dict:
        """Stream frame `i` (noise frame index `frame`), model input `x`, served prediction `served`."""
        with self._lock:
            clean_outputs = self.clean.run(x, frame)
            uncalibrated_outputs = self.uncalibrated.run(x, frame)
        clean = self.proc.postprocess(clean_outputs[:-1] if self._drop_last else clean_outputs, ctx)
        uncal = self.proc.postprocess(uncalibrated_outputs, ctx)
        task = self.task
        sample = {"frame": i, "clean": short_prediction(task, clean), "uncalibrated": short_prediction(task, uncal),
                  "served": short_prediction(task, served), "before": round(agreement(task, clean, uncal), 3),
                  "after": round(agreement(task, clean, served), 3)}
        self.samples.append((i, sample["before"], sample["after"]))
        return sample


def agreement_summary(task: str, sampler: AgreementSampler | None, frames_total: int) -> dict:
    """Mean agreement (%) over the sampled frames of the second half of the stream (at most the latest
    MAX_SAMPLES samples); None without samples."""
    late = [s for s in sampler.samples if s[0] >= frames_total / 2] if sampler else []
    out = {"agreement_metric": AGREEMENT_METRICS.get(task), "agreement_samples": len(late),
           "agreement_before": None, "agreement_after": None}
    if late:
        out["agreement_before"] = round(float(np.mean([s[1] for s in late])), 2)
        out["agreement_after"] = round(float(np.mean([s[2] for s in late])), 2)
    return out
