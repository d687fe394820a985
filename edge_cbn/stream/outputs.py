"""Where a stream's frames and results go: a window, the browser preview, a recording, a JSON-lines log,
and the words a prediction is described in."""
from __future__ import annotations

import contextlib
import json

import cv2
import numpy as np

from . import overlay
from .agreement import output_norm, short_prediction
from .options import StreamError, StreamOptions, warn
from .preview import PreviewServer


def describe(task: str, pred) -> str:
    """A prediction in a few words (progress lines, the preview's "result", a raw model's overlay).

    Args:
        task: the bundle's task.
        pred: what `Processor.postprocess` returned.

    Returns:
        E.g. "cat 0.87", "3 objects: car, dog", "classes [15]", "raw: 2 outputs, |y| 12.3" (ASCII: the
        overlay draws it with cv2.putText).
    """
    if task == "classification":
        return f"{pred[0][1]} {pred[0][2]:.2f}" if pred else "-"
    if task == "detection":
        names = sorted({d[1] for d in pred})
        return f"{len(pred)} objects" + (f": {', '.join(names[:5])}" if names else "")
    if task == "raw":
        norm = output_norm(pred)
        return f"raw: {len(pred)} output{'s' if len(pred) != 1 else ''}, |y| " + (
            "not finite" if norm is None else f"{norm:.3g}")
    classes = sorted(int(c) for c in np.unique(pred) if c)
    return f"classes {classes}" if classes else "background"


def log_fields(task: str, pred) -> dict:
    """A prediction's fields in a frame's log line.

    Args:
        task: the bundle's task.
        pred: what `Processor.postprocess` returned.

    Returns:
        {"top": [label, score]}, {"detections": n}, {"classes": [ids]} or, for a raw model, {"norm": its
        outputs' L2 norm} (as in the agreement samples, `short_prediction`).
    """
    if task == "classification":
        return {"top": [pred[0][1], round(pred[0][2], 4)] if pred else None}
    if task == "detection":
        return {"detections": len(pred)}
    if task == "raw":
        return {"norm": short_prediction(task, pred)}
    return {"classes": sorted(int(c) for c in np.unique(pred) if c)}


def draw_prediction(frame, task, pred, labels):
    """Draw a prediction on a frame, in place.

    Args:
        frame: the BGR uint8 frame.
        task: the bundle's task.
        pred: what `Processor.postprocess` returned.
        labels: the class names (detection tags; may be empty).

    Returns:
        `frame`, with top-k lines, boxes, the class mask or (raw) the `describe` line drawn on it.
    """
    if task == "classification":
        overlay.draw_classification(frame, [(label, score) for _, label, score in pred])
    elif task == "detection":
        if pred:
            overlay.draw_detections(frame, [d[3] for d in pred], [d[2] for d in pred], [d[0] for d in pred],
                                    labels or None)
    elif task == "raw":
        overlay.draw_text_lines(frame, [describe(task, pred)])
    else:
        overlay.draw_segmentation(frame, pred)
    return frame


class Display:
    """cv2.imshow window; 'q' or Esc stops.  An OpenCV without GUI support (opencv-python-headless)
    turns it off with one warning."""

    def __init__(self):
        self.ok = True

    def show(self, frame) -> bool:
        """False when the user asked to quit."""
        if not self.ok:
            return True
        try:
            cv2.imshow("edge-cbn", frame)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error:
            self.ok = False
            warn("this OpenCV has no window support (opencv-python-headless?): running headless; "
                 "use --serve PORT for a browser preview")
            return True
        return key not in (27, ord("q"))

    def close(self):
        if self.ok:
            with contextlib.suppress(cv2.error):
                cv2.destroyAllWindows()


class Recorder:
    def __init__(self, path, fps):
        self.path, self.fps, self.writer, self.size = str(path), fps or 10.0, None, None

    def write(self, frame):
        if self.writer is None:
            self.size = (frame.shape[1], frame.shape[0])
            self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise StreamError(f"cannot write video {self.path}")
        if (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size)
        self.writer.write(frame)

    def close(self):
        if self.writer is not None:
            self.writer.release()


class Outputs:
    """The outputs `opts` asks for, opened together (a failure is one StreamError line) and closed
    together; `emit` hands one annotated frame to each."""

    def __init__(self, opts: StreamOptions, fps_hint, echo):
        self.display = None if opts.headless else Display()
        self.recorder = Recorder(opts.record, fps_hint) if opts.record else None
        self.preview = self.log = None
        if opts.serve is not None:
            try:
                self.preview = PreviewServer(opts.host, opts.serve)
            except OSError as err:
                raise StreamError(f"cannot serve on {opts.host}:{opts.serve}: {err.strerror or err}") from None
            if not opts.quiet:
                echo(f"preview on {self.preview.url}")
        if opts.log:
            try:
                self.log = open(opts.log, "w", buffering=1)
            except OSError as err:
                raise StreamError(f"cannot write the log {opts.log}: {err.strerror or err}") from None

    @property
    def shows_frames(self) -> bool:
        """Someone sees the frames (headless without outputs: nobody sees an overlay)."""
        return bool(self.display or self.recorder or self.preview)

    @property
    def on_screen(self) -> bool:
        return self.display is not None and self.display.ok

    def emit(self, frame, log_line, status) -> bool:
        """The frame to the preview, recording and window, `log_line()` to the log and `status()` to the
        preview (each made only when used).  False when the user asked to quit."""
        if self.log is not None:
            self.log.write(json.dumps(log_line()) + "\n")
        if self.preview is not None:
            self.preview.publish(frame)
            self.preview.update_status(status())
        if self.recorder is not None:
            self.recorder.write(frame)
        return self.display is None or self.display.show(frame)

    def close(self, summary: dict | None) -> None:
        for closer in (self.recorder, self.display, self.preview):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        if self.log is not None:
            if summary is not None:
                self.log.write(json.dumps({"summary": summary}) + "\n")
            self.log.close()
