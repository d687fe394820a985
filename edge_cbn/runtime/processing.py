"""A bundle's pre- and postprocessing on the device: BGR frame -> model input, model outputs -> task
results (classification top-k, YOLO detections, segmentation masks, a raw model's outputs as they are).
numpy + OpenCV only."""
from __future__ import annotations

import math

import cv2
import numpy as np

from .detection import decode_yolo, letterbox, nms, unletterbox


def normalise(rgb: np.ndarray, preprocess: dict) -> np.ndarray:
    """(rgb - mean) / std as float32 for RGB images of any leading shape (offline batches; the per-frame
    path in `Processor.preprocess` looks the same values up in a table made by this function)."""
    return (rgb.astype(np.float32) - np.float32(preprocess["mean"])) / np.float32(preprocess["std"])


def model_input(rgb: np.ndarray, bundle) -> np.ndarray:
    """RGB uint8 images at the model's input size (any leading shape) -> what `bundle`'s model takes:
    the pixels as they are for a uint8-input model, else normalised float32 (offline batches).

    Args:
        rgb: RGB uint8 images at the model's input size, shape (..., H, W, 3).
        bundle: the exported `Bundle` whose model takes them.

    Returns:
        `rgb` itself when the model takes uint8 (`Bundle.raw_input`), else (rgb - mean) / std as float32 of
        the same shape, with the sidecar meta's "preprocess" mean and std.
    """
    return rgb if bundle.raw_input else normalise(rgb, bundle.meta["preprocess"])


def top_k(logits, labels, k: int = 5) -> list[tuple[int, str, float]]:
    """(class_id, label, probability) of the k best classes, best first.  Softmax is applied unless the
    values already form a probability distribution (a model ending in softmax).

    It runs right after an invoke, on cold caches where every numpy call costs several times its warm
    time, so it makes few calls: k argmax passes on the raw values (k is a handful; softmax keeps the
    order), and the distribution test only when the best value could be a probability (the timings:
    docs/BENCHMARKS.md)."""
    v = np.array(logits, np.float64).reshape(-1)  # one float64 copy: the passes mark taken classes in it
    ids, top = [], []
    for _ in range(min(k, v.size)):
        i = int(v.argmax())
        ids.append(i)
        top.append(float(v[i]))
        v[i] = -np.inf
    if not ids:
        return []
    v[ids] = top
    if top[0] <= 1 and v.min() >= 0 and abs(float(v.sum()) - 1) < 1e-3:
        probs = top
    else:
        z = float(np.exp(v - top[0]).sum())
        probs = [math.exp(t - top[0]) / z for t in top]
    return [(i, labels[i] if i < len(labels) else str(i), p) for i, p in zip(ids, probs)]


def flat_outputs(outputs) -> np.ndarray:
    """A raw model's outputs as one vector: each flattened, concatenated in order, as float64.

    Args:
        outputs: the model's output arrays (any shapes).

    Returns:
        A new 1-d float64 array (empty for no outputs).
    """
    return np.concatenate([np.asarray(o, np.float64).reshape(-1) for o in outputs] or [np.zeros(0)])


class Processor:
    """A bundle's pre- and postprocessing (from its sidecar meta), independent of any interpreter.

    Args:
        bundle: an exported `Bundle`; its meta gives the task, input size, preprocessing, labels and head.
        max_results: classification: how many classes `postprocess` returns.
        conf_threshold: detection: the lowest score kept (0..1).
        iou_threshold: detection: the overlap (IoU) above which non-maximum suppression drops the
            lower-scoring box of a class.

    Raises:
        ValueError: a letterboxing model that takes uint8 input.
    """

    def __init__(self, bundle, *, max_results: int = 5, conf_threshold: float = 0.25,
                 iou_threshold: float = 0.45):
        self.bundle, self.meta = bundle, bundle.meta
        self.task = self.meta["task"]
        self.input_hw = tuple(self.meta["input_size"])
        pre = self.meta["preprocess"]
        self.letterbox = bool(pre.get("letterbox", False))
        self.raw_input = bundle.raw_input
        if self.letterbox and self.raw_input:
            raise ValueError("a letterboxing model needs float input (its grey, 127.5, is no uint8 value)")
        # Float-input models: normalise() of every uint8 level per channel, so that one table lookup
        # per pixel makes the model input in one pass, equal to the offline path bit for bit.
        levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
        self._lut = None if self.raw_input else normalise(levels, pre).reshape(1, 256, 3)
        self.labels = list(self.meta.get("labels") or [])
        self.max_results, self.conf_threshold, self.iou_threshold = max_results, conf_threshold, iou_threshold
        # Buffers reused frame after frame: fresh 0.6 MB arrays per frame cost page faults.
        h, w = self.input_hw
        self._bgr, self._rgb = np.empty((h, w, 3), np.uint8), np.empty((h, w, 3), np.uint8)
        self._x = self._rgb[None] if self.raw_input else np.empty((1, h, w, 3), np.float32)

    def preprocess(self, frame_bgr: np.ndarray):
        """BGR uint8 frame -> ((1, H, W, 3) model input, context for postprocess).  The input array
        belongs to the Processor and is overwritten by the next call.

        Args:
            frame_bgr: a BGR uint8 image (h, w, 3) of any size, as OpenCV reads it.

        Returns:
            (x, ctx): x the (1, H, W, 3) model input, float32 (uint8 for a raw-input model); ctx the frame's
            size and letterbox geometry, for `postprocess`.
        """
        h, w = self.input_hw
        ctx = {"orig_hw": frame_bgr.shape[:2], "scale": None, "pad": None}
        if self.letterbox:  # a float canvas (its grey is 127.5): arithmetic, not the table
            img, ctx["scale"], ctx["pad"] = letterbox(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB), (h, w))
            self._x[0] = normalise(img, self.meta["preprocess"])
        else:  # resize first: the colour conversion and the lookup then touch fewer pixels
            cv2.resize(frame_bgr, (w, h), dst=self._bgr, interpolation=cv2.INTER_LINEAR)
            cv2.cvtColor(self._bgr, cv2.COLOR_BGR2RGB, dst=self._rgb)
            if not self.raw_input:
                cv2.LUT(self._rgb, self._lut, dst=self._x[0])
        return self._x, ctx

    def postprocess(self, outputs: list[np.ndarray], ctx: dict, max_results: int | None = None):
        """The task's results from the model's outputs on one frame.

        Args:
            outputs: the model's outputs in the exported order (`NoisyModel.run`; a calibration variant's
                moments output removed).
            ctx: what `preprocess` returned with this frame's input.
            max_results: classification: the classes returned this time (None: the Processor's).

        Returns:
            classification: [(class_id, label, score)] best first; segmentation: (h, w) class-id mask at
            frame size; detection: [(class_id, label, score, (x1, y1, x2, y2) in frame pixels)] best first;
            raw: the output arrays, float32 copies (an interpreter overwrites its own at the next invoke).

        Raises:
            ValueError: the meta names an unknown task.
        """
        if self.task == "classification":
            return top_k(outputs[0], self.labels, max_results or self.max_results)
        if self.task == "segmentation":
            mask = np.argmax(outputs[0][0], axis=-1).astype(np.uint8)
            oh, ow = ctx["orig_hw"]
            return cv2.resize(mask, (ow, oh), interpolation=cv2.INTER_NEAREST)
        if self.task == "detection":
            return self._detections(outputs, ctx)
        if self.task == "raw":
            return [np.array(o, np.float32) for o in outputs]
        raise ValueError(f"unknown task {self.task!r}")

    def _detections(self, outputs, ctx):
        outputs = sorted(outputs, key=lambda o: int(o.shape[1]))  # head maps by stride 32, 16, 8 = growing grid
        boxes, scores, ids = decode_yolo(outputs, self.input_hw, self.meta["head"], self.conf_threshold)
        keep = nms(boxes, scores, ids, self.iou_threshold)
        boxes, scores, ids = boxes[keep], scores[keep], ids[keep]
        if ctx["scale"] is not None:
            boxes = unletterbox(boxes, ctx["scale"], ctx["pad"], ctx["orig_hw"])
        else:
            (oh, ow), (h, w) = ctx["orig_hw"], self.input_hw
            boxes = boxes * np.float32([ow / w, oh / h, ow / w, oh / h])
        return [(int(c), self.labels[c] if c < len(self.labels) else str(c), float(s), tuple(map(float, b)))
                for c, s, b in zip(ids, scores, boxes)]
