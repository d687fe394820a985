"""The paper's metrics, accumulated one prediction at a time, all in percent: top-1 / top-5 (Table 1),
COCO mAP@0.5 / mAR@0.5 through pycocotools (Table 2; the AP interpolation is pycocotools', never ours),
mIoU / pixel accuracy from one confusion matrix summed over the images (Table 3).

Each scorer takes `add(sample, prediction)` with a prediction as `runtime.processing.Processor.postprocess`
returns it, and `result()` -> {metric: percent}.  It keeps what each image contributed, so `resampled(weights)`
gives the metrics over resamples of the images (`bootstrap`: each resample counts every image as often as it
was drawn), the test-set half of the intervals `report` prints.  A sweep sharded over workers
(`lab/evaluate/parallel_sweep.py`) merges them exactly: `state()` is a shard's partial result as JSON (the
per-image hits, confusion matrices or detections), and `merge(state)` adds another shard's, in evaluation
order, so the merged scorer holds what one scorer over all the samples would."""
from __future__ import annotations

import contextlib
import io

import numpy as np

from ...runtime.errors import BadInput
from . import bootstrap
from .datasets import VOC_IGNORE, read_mask

METRICS = {"classification": ("top1", "top5"), "detection": ("map50", "mar50"), "segmentation": ("miou", "pixacc")}
TITLES = {"top1": "top-1", "top5": "top-5", "map50": "mAP@0.5", "mar50": "mAR@0.5", "miou": "mIoU", "pixacc": "PixAcc"}


class TopK:
    """Top-1 and top-5 accuracy; a prediction is the classes best first ((class, label, prob) tuples)."""

    def __init__(self):
        self.top1, self.top5 = [], []  # per image: 1 if the truth is first / in the first five

    def __len__(self) -> int:
        return len(self.top1)

    def add(self, sample, prediction) -> None:
        ranked = [p[0] for p in prediction]
        self.top1.append(int(ranked[:1] == [sample.truth]))
        self.top5.append(int(sample.truth in ranked[:5]))

    def result(self) -> dict:
        n = max(len(self), 1)
        return {"top1": 100.0 * sum(self.top1) / n, "top5": 100.0 * sum(self.top5) / n}

    def resampled(self, weights: np.ndarray) -> dict:
        n = max(len(self), 1)
        return {k: 100.0 * (weights @ np.asarray(getattr(self, k), np.float64)) / n for k in ("top1", "top5")}

    def state(self) -> dict:
        return {"top1": self.top1, "top5": self.top5}

    def merge(self, state: dict) -> None:
        self.top1, self.top5 = self.top1 + state["top1"], self.top5 + state["top5"]


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, n: int, ignore: int = VOC_IGNORE) -> np.ndarray:
    """(n, n) counts, rows the true class, columns the predicted one; pixels labelled `ignore` left out."""
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    keep = truth != ignore
    pred, truth = pred[keep].astype(np.int64), truth[keep].astype(np.int64)
    if truth.size and truth.max() >= n:
        raise ValueError(f"true class {int(truth.max())} but only {n} classes (label {ignore} is the ignored one)")
    if pred.size and pred.max() >= n:
        raise ValueError(f"predicted class {int(pred.max())} but only {n} classes")
    return np.bincount(truth * n + pred, minlength=n * n).reshape(n, n)


def miou_pixacc(conf: np.ndarray) -> dict:
    """mIoU: per class TP / (TP + FP + FN), averaged over the classes that occur (in the truth or the
    prediction; a class that never does has no IoU), as the VOC devkit; pixel accuracy: TP / all."""
    miou, pixacc = miou_pixacc_of_many(np.asarray(conf)[None])
    return {"miou": float(miou[0]), "pixacc": float(pixacc[0])}


def miou_pixacc_of_many(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`miou_pixacc` of each (n, n) matrix of a (k, n, n) stack: (k,) mIoU and (k,) pixel accuracy, in percent."""
    conf = np.asarray(conf, np.float64)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    union = conf.sum(1) + conf.sum(2) - tp
    occurs = union > 0
    iou_sum = np.where(occurs, tp / np.where(occurs, union, 1.0), 0.0).sum(1)
    classes, total = occurs.sum(1), conf.sum((1, 2))
    miou = np.where(classes > 0, 100.0 * iou_sum / np.maximum(classes, 1), 0.0)
    return miou, np.where(total > 0, 100.0 * tp.sum(1) / np.where(total > 0, total, 1.0), 0.0)


class Segmentation:
    """mIoU and pixel accuracy over a confusion matrix summed across images (not a mean of per-image
    scores); a prediction is a class mask at the image's size, the truth the sample's mask PNG."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.images = []  # per image: (flat indices, counts) of its confusion matrix's non-zero cells

    def __len__(self) -> int:
        return len(self.images)

    def add(self, sample, prediction) -> None:
        truth = read_mask(sample.truth)
        if truth.shape != prediction.shape:
            raise BadInput(sample.truth, f"mask is {truth.shape} but its image is {prediction.shape}")
        try:
            flat = confusion_matrix(prediction, truth, self.num_classes).ravel()
        except ValueError as e:
            raise BadInput(sample.truth, str(e)) from None
        cells = np.flatnonzero(flat)
        self.images.append((cells, flat[cells]))

    def per_image(self) -> np.ndarray:
        """(images, n * n) each image's confusion matrix, flattened."""
        out = np.zeros((len(self.images), self.num_classes ** 2), np.int64)
        for row, (cells, counts) in zip(out, self.images):
            row[cells] = counts
        return out

    @property
    def conf(self) -> np.ndarray:
        """The (n, n) confusion matrix summed over the images."""
        return self.per_image().sum(0).reshape(self.num_classes, self.num_classes)

    def result(self) -> dict:
        return miou_pixacc(self.conf)

    def resampled(self, weights: np.ndarray) -> dict:
        n = self.num_classes
        miou, pixacc = miou_pixacc_of_many((weights @ self.per_image()).reshape(-1, n, n))
        return {"miou": miou, "pixacc": pixacc}

    def state(self) -> dict:
        return {"images": [[c.tolist(), k.tolist()] for c, k in self.images]}

    def merge(self, state: dict) -> None:
        self.images += [(np.asarray(c, np.int64), np.asarray(k, np.int64)) for c, k in state["images"]]


def category_ids(labels: list[str], coco, stated: list[int] | None = None) -> list[int | None]:
    """The COCO category id of each model class: `stated` (one id per class, in class order) or the
    annotation file's category of the same name (case and spaces ignored); None for a class that has none."""
    if stated is not None:
        if len(stated) != len(labels):
            raise ValueError(f"{len(stated)} category ids for {len(labels)} model classes")
        unknown = sorted(set(stated) - set(coco.getCatIds()))
        if unknown:
            raise ValueError(f"category ids {unknown} are not in the annotation file")
        return list(stated)
    key = lambda s: " ".join(str(s).lower().split())  # noqa: E731
    by_name = {key(c["name"]): c["id"] for c in coco.loadCats(coco.getCatIds())}
    ids = [by_name.get(key(label)) for label in labels]
    if not any(i is not None for i in ids):
        raise ValueError("no model class has the name of a COCO category of the annotation file: state the "
                         "mapping with --category-ids")
    return ids


class CocoDetection:
    """mAP@0.5 and mAR@0.5 (COCO's, area all, 100 detections per image) by pycocotools' COCOeval; a
    prediction is [(class, label, score, (x1, y1, x2, y2) in image pixels)]."""

    def __init__(self, coco, categories: list[int | None]):
        self.coco, self.categories = coco, categories
        self.detections, self.image_ids = [], []

    def add(self, sample, prediction) -> None:
        self.image_ids.append(sample.truth)
        for cls, _, score, (x1, y1, x2, y2) in prediction:
            cat = self.categories[cls] if cls < len(self.categories) else None
            if cat is not None:  # a class the annotations do not have cannot be right or wrong
                self.detections.append({"image_id": sample.truth, "category_id": cat, "score": float(score),
                                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})

    def __len__(self) -> int:
        return len(self.image_ids)

    def evaluated(self):
        """COCOeval of what has been added, run once for `result` and `resampled` (None: nothing detected)."""
        size = (len(self.detections), len(self.image_ids))
        if getattr(self, "_evaluated", (None,))[0] != size:
            self._evaluated = (size, coco_eval(self.coco, self.detections, self.image_ids))
        return self._evaluated[1]

    def result(self) -> dict:
        return coco_map_mar50(self.evaluated())

    def resampled(self, weights: np.ndarray) -> dict:
        """mAP@0.5 and mAR@0.5 over resamples of the images, from one COCOeval matching
        (`bootstrap.coco_ap50_resampled`; on the identity resample it equals `result`)."""
        ev = self.evaluated()
        if ev is None:
            return {"map50": np.zeros(len(weights)), "mar50": np.zeros(len(weights))}
        position = {image: i for i, image in enumerate(ev.params.imgIds)}
        by_image = np.zeros((len(weights), len(position)))
        for j, image in enumerate(self.image_ids):  # a sample's weight goes to its image's column
            by_image[:, position[image]] += weights[:, j]
        return bootstrap.coco_ap50_resampled(ev, by_image)

    def state(self) -> dict:
        return {"detections": self.detections, "image_ids": self.image_ids}

    def merge(self, state: dict) -> None:
        """Another shard's detections after these: concatenated, then evaluated once by `result`."""
        self.detections += state["detections"]
        self.image_ids += state["image_ids"]

    def __getstate__(self) -> dict:
        """A worker's copy collects detections only: the annotations stay with the driver, which merges
        the shards and runs COCOeval once."""
        return {**self.__dict__, "coco": None, "_evaluated": (None,)}


def coco_eval(coco, detections: list[dict], image_ids: list[int]):
    """pycocotools' COCOeval (bbox) on `image_ids`, evaluated, accumulated and summarised; None when
    nothing was detected (loadRes refuses an empty list)."""
    from pycocotools.cocoeval import COCOeval  # lazy: pycocotools is optional (the [eval] extra), detection only

    if not detections:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and tables
        ev = COCOeval(coco, coco.loadRes(detections), "bbox")
        ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def coco_map_mar50(ev) -> dict:
    """From a `coco_eval`: AP at IoU 0.5 (its stats[1]) and recall at IoU 0.5 with 100 detections per image
    over all areas, averaged over the categories that have ground truth."""
    if ev is None:  # nothing detected is 0 / 0
        return {"map50": 0.0, "mar50": 0.0}
    t = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    area, dets = ev.params.areaRngLbl.index("all"), ev.params.maxDets.index(100)
    recall = ev.eval["recall"][t, :, area, dets]
    recall = recall[recall > -1]  # -1: a category without ground truth in these images
    return {"map50": 100.0 * max(float(ev.stats[1]), 0.0),
            "mar50": 100.0 * float(recall.mean()) if recall.size else 0.0}


def bootstrap_replicates(scorer, resamples: int = bootstrap.RESAMPLES) -> dict:
    """{metric: [value per resample]} of a filled scorer, over `bootstrap.resample_weights` of its images
    (the same resamples for every scorer of as many images: the methods and chips of a sweep pair)."""
    weights = bootstrap.resample_weights(len(scorer), resamples)
    return {m: np.round(np.asarray(v, np.float64), 4).tolist() for m, v in scorer.resampled(weights).items()}
