"""YOLO post-processing on the device: letterbox, decode the raw head maps, class-wise NMS, map boxes
back to the original image.  numpy only (OpenCV for resizing); never imports TensorFlow or workstation
modules.

Decoding follows darknet's `[yolo]` layer: a map `(1, H, W, A*(5+C))` holds, per cell and anchor,
`tx, ty, tw, th, obj, class logits`; box centre `(sigmoid(t) + cell) * stride`, size `exp(t) * anchor`
(anchors in input pixels), score `sigmoid(obj) * sigmoid(class)`."""
from __future__ import annotations

import cv2
import numpy as np

PAD_VALUE = 127.5  # darknet letterboxes with 0.5 grey


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def decode_yolo(outputs, input_hw, head: dict, conf_threshold: float = 0.25):
    """Raw head maps (strides 32, 16, 8 as in `head["strides"]`) -> `(boxes (N, 4) x1, y1, x2, y2 in input
    pixels, scores (N,), class_ids (N,))`, one entry per (box, class) whose score exceeds the threshold
    (darknet keeps every class above threshold, not just the best)."""
    in_h, in_w = input_hw
    anchors = np.asarray(head["anchors"], np.float32)
    all_boxes, all_scores, all_ids = [], [], []
    for out, mask, stride in zip(outputs, head["masks"], head["strides"]):
        out = np.asarray(out, np.float32)
        out = out.reshape(out.shape[-3], out.shape[-2], len(mask), -1)  # (H, W, A, 5 + C)
        h, w = out.shape[:2]
        if (h * stride, w * stride) != (in_h, in_w):
            raise ValueError(f"head map {h}x{w} at stride {stride} does not match input {in_h}x{in_w}")
        cy, cx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        xc = (_sigmoid(out[..., 0]) + cx[..., None]) * stride
        yc = (_sigmoid(out[..., 1]) + cy[..., None]) * stride
        bw = np.exp(out[..., 2]) * anchors[mask, 0]
        bh = np.exp(out[..., 3]) * anchors[mask, 1]
        boxes = np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], -1).reshape(-1, 4)
        probs = (_sigmoid(out[..., 4:5]) * _sigmoid(out[..., 5:])).reshape(len(boxes), -1)
        box_idx, cls = np.nonzero(probs > conf_threshold)
        all_boxes.append(boxes[box_idx])
        all_scores.append(probs[box_idx, cls])
        all_ids.append(cls)
    return (np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_scores).astype(np.float32),
            np.concatenate(all_ids).astype(np.int64))


def _area(b):
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1, y1, x2, y2 box with each of `boxes`."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = _area(box) + _area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# Candidates NMS looks at, best first: the greedy loop is quadratic, and a noisy detector at a low
# threshold (mAP evaluation) can emit thousands of boxes; YOLO's own NMS caps them the same way.
MAX_NMS_CANDIDATES = 1000


def nms(boxes, scores, class_ids, iou_threshold: float = 0.45, max_candidates: int = MAX_NMS_CANDIDATES) -> np.ndarray:
    """Greedy class-wise non-maximum suppression over the `max_candidates` best boxes: indices of the kept
    boxes, best score first.  A box is dropped when its IoU with a better-scoring kept box of the same
    class exceeds `iou_threshold`."""
    boxes, scores, class_ids = np.asarray(boxes, np.float32), np.asarray(scores), np.asarray(class_ids)
    order = np.argsort(-scores, kind="stable")[:max_candidates]
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        same = class_ids[rest] == class_ids[best]
        overlap = box_iou(boxes[best], boxes[rest]) > iou_threshold
        order = rest[~(same & overlap)]
    return np.asarray(keep, np.int64)


def letterbox(image_rgb: np.ndarray, size):
    """Resize keeping aspect ratio into a `size` (int or (h, w)) canvas of 127.5 grey, centred as darknet
    does.  Returns (float32 canvas in pixel units, scale, (pad_x, pad_y))."""
    out_h, out_w = (size, size) if np.isscalar(size) else size
    h, w = image_rgb.shape[:2]
    scale = min(out_w / w, out_h / h)
    new_w, new_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    resized = cv2.resize(image_rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_x, pad_y = (out_w - new_w) // 2, (out_h - new_h) // 2
    canvas = np.full((out_h, out_w, image_rgb.shape[2]), PAD_VALUE, np.float32)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
    return canvas, scale, (pad_x, pad_y)


def unletterbox(boxes, scale: float, pad, orig_hw) -> np.ndarray:
    """Map x1, y1, x2, y2 boxes from letterboxed input pixels back to the original image, clipped to it."""
    pad_x, pad_y = pad
    h, w = orig_hw
    out = (np.asarray(boxes, np.float32).reshape(-1, 4) - [pad_x, pad_y, pad_x, pad_y]) / scale
    return np.clip(out, 0, [w, h, w, h]).astype(np.float32)
