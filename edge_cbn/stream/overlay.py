"""Draw results and status on BGR frames (in place; every function also returns the frame).

Task results: :func:`draw_classification` (top-k "label: score" lines), :func:`draw_detections` (boxes
with class name and score, one colour per class), :func:`draw_segmentation` (class mask blended with
the PASCAL VOC palette). Always drawn: :func:`draw_hud` (FPS, noise level, calibration progress bar).
:class:`FpsCounter` averages the frame rate over the last 10 frames, like the TFLite Raspberry Pi
examples. ``cv2.putText`` only draws ASCII, so the noise text says "eta", not the Greek letter.
Device side: numpy and OpenCV only.
"""
from __future__ import annotations

import collections
import time
from typing import Callable, Iterable, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "FpsCounter",
    "voc_palette",
    "class_color",
    "noise_text",
    "draw_text_lines",
    "draw_classification",
    "draw_detections",
    "draw_segmentation",
    "draw_progress",
    "draw_hud",
]

FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_COLOR = (255, 255, 255)
PANEL_COLOR = (0, 0, 0)


class FpsCounter:
    """Frames per second over the last ``window`` frames: call :meth:`tick` once per frame."""

    def __init__(self, window: int = 10, clock: Callable[[], float] = time.perf_counter):
        self._times = collections.deque(maxlen=window + 1)
        self._clock = clock

    def tick(self, now: Optional[float] = None) -> float:
        self._times.append(self._clock() if now is None else now)
        return self.fps

    @property
    def fps(self) -> float:
        """Average rate of the frames in the window; 0.0 until two frames were seen."""
        if len(self._times) < 2 or self._times[-1] <= self._times[0]:
            return 0.0
        return (len(self._times) - 1) / (self._times[-1] - self._times[0])


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, ``(n, 3)`` uint8 **RGB** (class 1 is ``[128, 0, 0]``)."""
    palette = np.zeros((n, 3), np.uint8)
    for label in range(n):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[label] = (r, g, b)
    return palette


_VOC_LUTS = [np.ascontiguousarray(channel) for channel in voc_palette()[:, ::-1].T]  # B, G, R


# 20 well separated colours (RGB hex), cycled by class id.
_CLASS_COLORS = [tuple(int(h[i:i + 2], 16) for i in (4, 2, 0)) for h in (  # hex RGB -> BGR tuple
    "FF3838 FF9D97 FF701F FFB21D CFD231 48F90A 92CC17 3DDB86 1A9334 00D4BB "
    "2C99A8 00C2FF 344593 6473FF 0018EC 8438FF 520085 CB38FF FF95C8 FF37C7").split()]


def class_color(class_id: int) -> Tuple[int, int, int]:
    """The BGR box colour of a class id (stable across frames)."""
    return _CLASS_COLORS[int(class_id) % len(_CLASS_COLORS)]


def noise_text(kind: Optional[str] = None, eta: Optional[float] = None, seed: Optional[int] = None) -> str:
    """E.g. ``noise relative eta=0.05 seed 0``; ``noise off`` without noise."""
    if not kind or not eta:
        return "noise off"
    text = f"noise {kind} eta={eta:g}"
    return text if seed is None else f"{text} seed {seed}"


def _scale(frame: np.ndarray) -> float:
    """Text scale that stays legible from 320x240 to 1920x1080."""
    return max(0.4, min(frame.shape[0], frame.shape[1] * 0.75) / 900)


def _panel(frame: np.ndarray, x0: int, y0: int, x1: int, y1: int, alpha: float = 0.5) -> None:
    """Darken a rectangle behind text (only that region is blended: cheap)."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 > x0 and y1 > y0:
        roi = frame[y0:y1, x0:x1]
        roi[:] = cv2.addWeighted(roi, 1 - alpha, np.zeros_like(roi), alpha, 0)


def draw_text_lines(frame: np.ndarray, lines: Sequence[str], origin: Tuple[int, int] = (8, 8),
                    color=TEXT_COLOR, scale: Optional[float] = None, panel: bool = True) -> np.ndarray:
    """Lines of text from the top-left ``origin``, on a darkened panel."""
    if not lines:
        return frame
    scale = scale or _scale(frame)
    thickness = max(1, round(scale * 1.5))
    sizes = [cv2.getTextSize(line, FONT, scale, thickness)[0] for line in lines]
    step = max(h for _, h in sizes) + int(10 * scale)
    x, y = origin
    if panel:
        _panel(frame, x - 4, y - 4, x + max(w for w, _ in sizes) + 4, y + step * len(lines) + 4)
    for i, line in enumerate(lines):
        cv2.putText(frame, line, (x, y + step * (i + 1) - int(6 * scale)), FONT, scale, color, thickness,
                    cv2.LINE_AA)
    return frame


def draw_classification(frame: np.ndarray, top: Iterable[Tuple[str, float]],
                        origin: Tuple[int, int] = (8, 8)) -> np.ndarray:
    """Top-k ``(label, score)`` pairs as ``label: 0.87`` lines at the top left."""
    return draw_text_lines(frame, [f"{label}: {score:.2f}" for label, score in top], origin)


def draw_detections(frame: np.ndarray, boxes, scores, classes, labels: Optional[Sequence[str]] = None
                    ) -> np.ndarray:
    """Boxes ``(N, 4)`` as pixel ``x0, y0, x1, y1`` on this frame, with ``name score`` tags."""
    scale = _scale(frame) * 0.8
    thickness = max(1, round(scale * 2))
    for box, score, cls in zip(np.asarray(boxes).reshape(-1, 4), np.ravel(scores), np.ravel(classes)):
        cls = int(cls)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        color = class_color(cls)
        cv2.rectangle(frame, (x0, y0), (x1, y1), color, thickness)
        name = labels[cls] if labels is not None and 0 <= cls < len(labels) else str(cls)
        tag = f"{name} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(tag, FONT, scale, 1)
        ty = y0 if y0 - th - base >= 0 else y0 + th + base  # inside the box at the top edge
        cv2.rectangle(frame, (x0, ty - th - base), (x0 + tw + 2, ty), color, cv2.FILLED)
        cv2.putText(frame, tag, (x0 + 1, ty - base), FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return frame


def draw_segmentation(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.5,
                      background: Optional[int] = 0) -> np.ndarray:
    """Blend the VOC colours of a class-id ``mask`` (any size: resized to the frame, nearest) over the
    frame; pixels of class ``background`` are left as they are (``background=None`` blends all)."""
    h, w = frame.shape[:2]
    mask = np.asarray(mask).astype(np.uint8)
    if mask.shape != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    colored = cv2.merge([cv2.LUT(mask, lut) for lut in _VOC_LUTS])  # per-channel LUTs: ~4x faster
    blended = cv2.addWeighted(frame, 1 - alpha, colored, alpha, 0)
    if background is None:
        frame[:] = blended
    else:
        cv2.copyTo(blended, cv2.compare(mask, int(background), cv2.CMP_NE), frame)
    return frame


def draw_progress(frame: np.ndarray, fraction: float, label: str, origin: Tuple[int, int],
                  size: Tuple[int, int], color=(0, 200, 0)) -> np.ndarray:
    """A progress bar (``fraction`` of 0..1 filled) of ``size`` (w, h) with ``label`` written on it."""
    x, y = origin
    w, h = size
    fraction = min(1.0, max(0.0, float(fraction)))
    cv2.rectangle(frame, (x, y), (x + w, y + h), (60, 60, 60), cv2.FILLED)
    if fraction > 0:
        cv2.rectangle(frame, (x, y), (x + int(round(w * fraction)), y + h), color, cv2.FILLED)
    cv2.rectangle(frame, (x, y), (x + w, y + h), TEXT_COLOR, 1)
    scale = h / 30
    (_, th), _ = cv2.getTextSize(label, FONT, scale, 1)
    cv2.putText(frame, label, (x + 4, y + (h + th) // 2), FONT, scale, TEXT_COLOR, 1, cv2.LINE_AA)
    return frame


def draw_hud(frame: np.ndarray, fps: float, noise: str = "noise off", progress: Optional[float] = None,
             progress_label: str = "") -> np.ndarray:
    """The always-on status block at the bottom left: FPS, the noise line and (if ``progress`` is not
    None) the calibration bar, e.g. ``draw_hud(f, 14.2, noise_text("relative", 0.05, 0), 37 / 64,
    "calibrating 37/64")``."""
    h, w = frame.shape[:2]
    scale = _scale(frame)
    lines = [f"FPS {fps:.1f}", noise]
    step = cv2.getTextSize("Ag", FONT, scale, 1)[0][1] + int(10 * scale)
    bar_h = int(step * 1.1) if progress is not None else 0
    top = h - 8 - step * len(lines) - (bar_h + 6 if bar_h else 0)
    draw_text_lines(frame, lines, (8, top), scale=scale)
    if progress is not None:
        label_w = cv2.getTextSize(progress_label, FONT, bar_h / 30, 1)[0][0]  # the bar holds its label
        bar_w = min(w - 16, max(w // 2, 160, label_w + 10))
        draw_progress(frame, progress, progress_label, (8, h - 8 - bar_h), (bar_w, bar_h))
    return frame
