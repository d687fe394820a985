"""Intervals over the test set and the chips: a two-level percentile bootstrap (Davison & Hinkley 1997,
§3.8, resampling both stages).

A result of `edge-cbn evaluate` is one chip (a seed of the noise) scored on N evaluation images.  Its
figures move with both: another chip, and another N images from the same distribution.  Each finished
result keeps its metrics on `RESAMPLES` resamples of its images (`resample_weights`: N draws with
replacement, every image counted as often as it was drawn), the same resamples for every method and chip
of a sweep, so that their replicates pair.  A table cell is the mean over its S chips; its replicate b
averages replicate b of S chips drawn with replacement (`chip_draws`, again the same for every cell with S
chips).  The interval is the 2.5th and 97.5th percentiles of those replicates, and a recovered share or a
difference between two methods is computed replicate by replicate, so its interval carries the pairing.

Detection's replicates need the AP of a resample without running COCOeval on it: `coco_ap50_resampled`
reads pycocotools' per-image matching at IoU 0.5 once and weights each detection by how often its image was
drawn, which on the identity resample gives pycocotools' own AP and recall (tested).
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
IMAGE_SEED, CHIP_SEED = 20261207, 7  # fixed: every sweep draws the same resamples
CHUNK = 100  # resamples at a time in `coco_ap50_resampled` (a chunk is CHUNK x detections floats)


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = IMAGE_SEED) -> np.ndarray:
    """(resamples, n) how often each of n images (or groups of them) is drawn in each of `resamples` draws of
    n with replacement."""
    draws = np.random.default_rng(seed).integers(0, max(n, 1), (resamples, n))
    return np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)


def chip_draws(chips: int, resamples: int) -> np.ndarray:
    """(resamples, chips) indices of the chips drawn, with replacement, for each resample."""
    return np.random.default_rng(CHIP_SEED).integers(0, chips, (resamples, chips))


def cell_replicates(per_chip: np.ndarray) -> np.ndarray:
    """(B,) replicates of a cell's mean over chips from its (chips, B) per-chip image replicates: replicate b
    averages replicate b of the chips `chip_draws` picks for it."""
    per_chip = np.asarray(per_chip, np.float64)
    chips, resamples = per_chip.shape
    picked = chip_draws(chips, resamples)
    return per_chip[picked, np.arange(resamples)[:, None]].mean(1)


def interval(replicates, level: float = LEVEL) -> tuple[float | None, float | None]:
    """The percentile interval of `replicates` at `level` (NaN replicates, e.g. a share of no loss, left
    out); (None, None) when there are none."""
    values = np.asarray(replicates if replicates is not None else [], np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None, None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def method_title() -> str:
    """How the intervals were made, for a table's header."""
    return (f"{LEVEL * 100:.0f} % interval: percentile bootstrap over the evaluation images and the chips, "
            f"{RESAMPLES:,} resamples, paired across methods")


# ------------------------------------------------------------------------------------ detection's AP

def coco_ap50_resampled(ev, weights: np.ndarray) -> dict:
    """{"map50", "mar50"}: (B,) AP and recall at IoU 0.5 (area all, 100 detections per image), averaged over
    the categories with ground truth in each resample, for `weights` (B, images in `ev.params.imgIds` order)
    of an evaluated COCOeval.  pycocotools' accumulate on a resample, with a detection drawn w times as w
    copies in a row: its 101-point interpolated precision is unchanged by the copies, so they are weights."""
    columns = [category_columns(ev, k) for k in range(len(ev.params.catIds))]
    ap, recall, counted = (np.zeros((len(weights), len(columns))) for _ in range(3))
    for start in range(0, len(weights), CHUNK):
        w = weights[start:start + CHUNK]
        for k, (image, tp, fp, gt_per_image) in enumerate(columns):
            ap[start:start + CHUNK, k], recall[start:start + CHUNK, k], counted[start:start + CHUNK, k] = \
                category_ap(w[:, image], tp, fp, w @ gt_per_image, ev.params.recThrs)
    n = np.maximum(counted.sum(1), 1)
    return {"map50": 100.0 * (ap * counted).sum(1) / n, "mar50": 100.0 * (recall * counted).sum(1) / n}


def category_columns(ev, k: int) -> tuple:
    """For category k: (image index, TP, FP) of every detection not ignored, best score first in
    pycocotools' order, and the (images,) count of ground truth not ignored, read from `ev.evalImgs`."""
    p = ev.params
    t = int(np.argmin(np.abs(p.iouThrs - 0.5)))
    area, images, max_dets = p.areaRngLbl.index("all"), len(p.imgIds), p.maxDets[-1]
    first = (k * len(p.areaRng) + area) * images
    scores, image, matched, gt_per_image = [], [], [], np.zeros(images)
    for i, e in enumerate(ev.evalImgs[first:first + images]):
        if e is None:
            continue
        gt_per_image[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        keep = ~np.asarray(e["dtIgnore"][t, :max_dets], bool)
        scores.append(np.asarray(e["dtScores"][:max_dets])[keep])
        matched.append(np.asarray(e["dtMatches"][t, :max_dets])[keep] > 0)
        image.append(np.full(int(keep.sum()), i))
    if not scores:
        return np.zeros(0, int), np.zeros(0), np.zeros(0), gt_per_image
    order = np.argsort(-np.concatenate(scores), kind="mergesort")  # pycocotools' order, ties by image
    tp = np.concatenate(matched)[order].astype(np.float64)
    return np.concatenate(image)[order], tp, 1.0 - tp, gt_per_image


def category_ap(w: np.ndarray, tp: np.ndarray, fp: np.ndarray, gt: np.ndarray, thresholds: np.ndarray) -> tuple:
    """(AP, recall, counted) per resample for one category: `w` (B, detections) each detection's weight,
    `gt` (B,) the ground truth drawn; counted is 0 where a resample drew none (pycocotools leaves it out)."""
    resamples = len(w)
    counted = (gt > 0).astype(np.float64)
    if not tp.size:
        return np.zeros(resamples), np.zeros(resamples), counted
    tp_sum, fp_sum = np.cumsum(w * tp, 1), np.cumsum(w * fp, 1)
    rc = tp_sum / np.where(gt > 0, gt, 1.0)[:, None]
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    envelope = np.maximum.accumulate(pr[:, ::-1], 1)[:, ::-1]
    ap = np.zeros(resamples)
    for b in range(resamples):
        at = np.searchsorted(rc[b], thresholds, side="left")
        ap[b] = np.where(at < rc.shape[1], envelope[b, np.minimum(at, rc.shape[1] - 1)], 0.0).mean()
    return ap, rc[:, -1], counted
