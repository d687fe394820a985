"""Frame sources: camera, video file, image folder, or the bundled sample clip.

Every source yields BGR ``uint8`` frames (``H x W x 3``), is an iterable and a context manager, has
``close()``, ``read()`` (the next frame, or ``None`` at the end), a ``name``, an ``fps`` hint (``None``
when unknown) and ``skipped`` (frames or files it could not decode).  A source that cannot be used at all
is refused at open with one :class:`SourceError` (a :class:`~edge_cbn.runtime.errors.BadInput`: "path:
reason"); a file source must deliver its first frame at open, so a video or folder with nothing readable
is refused there too.  Problems while streaming are warnings on the ``edge_cbn.stream.sources`` logger and
the stream goes on:

* a stretch of undecodable video frames, of any length, is skipped with one warning and counted; the end
  of the file is where the frames the container declares run out (see :class:`VideoSource`);
* an image file that cannot be read is skipped with one warning and counted (not tried again when looping);
* a camera whose read fails is reopened with exponential backoff (0.5 s doubling up to 8 s by default)
  until it comes back or the source is closed; a camera read that does not return is reported by
  :class:`Prefetched` (``stall_warning_s``).

FFmpeg's own log (hundreds of "error while decoding MB" lines for one damaged stretch) is kept off the
terminal unless ``--debug`` (``EDGE_CBN_DEBUG``): the warnings above say what was skipped.

Device side: numpy and OpenCV only. ``picamera2`` is imported lazily, only when asked for.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import cv2
import numpy as np

from ..runtime.errors import BadInput
from ..runtime.images import read_image
from .sample import sample_path

log = logging.getLogger(__name__)

__all__ = [
    "SourceError",
    "FrameSource",
    "CameraSource",
    "VideoSource",
    "ImageDirSource",
    "Prefetched",
    "open_source",
    "debug_enabled",
]

# A declared frame count is believed only up to one frame per this many bytes of the file (the smallest
# framing a video frame has: an MP4 size entry, an Annex-B start code), so a forged header cannot make the
# end of a file look like an endless corrupt stretch (failed reads at the end cost about 1 us each).
MIN_FRAME_BYTES = 4


class SourceError(BadInput):
    """A frame source could not be opened (missing file, folder or device, unreadable video)."""


def debug_enabled() -> bool:
    """``--debug`` (the CLI sets ``EDGE_CBN_DEBUG=1`` for it): the decoders' own logs are shown."""
    return os.environ.get("EDGE_CBN_DEBUG", "") not in ("", "0")


def _quiet_ffmpeg() -> None:
    """FFmpeg's log level to quiet (-8, AV_LOG_QUIET) unless --debug or the user chose one.  OpenCV reads
    ``OPENCV_FFMPEG_LOGLEVEL`` once, when its FFmpeg backend first starts, so this runs before the first
    capture opens (the stream opens its source before anything else that uses FFmpeg)."""
    if not debug_enabled():
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


class FrameSource:
    """Base class: subclasses implement :meth:`_next` (the next frame or None) and :meth:`_release`.

    A file source calls :meth:`_take_first` at open: its first frame is read then (and handed out by the
    first ``read``), so a source with no readable frame is refused at start, not found empty mid-stream.
    """

    name = "source"
    fps: Optional[float] = None
    live = False  # a device whose read may block (reconnecting); close() from another thread ends it
    skipped = 0  # frames (or files) that could not be decoded and were skipped
    _first: Optional[np.ndarray] = None

    def _next(self) -> Optional[np.ndarray]:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def _take_first(self, nothing: str) -> None:
        self._first = self._next()
        if self._first is None:
            self.close()
            raise SourceError(self.name, nothing)

    def read(self) -> Optional[np.ndarray]:
        if self.closed:
            return None
        frame, self._first = self._first, None
        return frame if frame is not None else self._next()

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def close(self) -> None:
        self._closed = True
        self._release()

    @property
    def closed(self) -> bool:
        return getattr(self, "_closed", False)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _as_bgr(frame: np.ndarray) -> np.ndarray:
    """Frames as 3-channel BGR uint8 whatever the reader returned (gray, BGRA)."""
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    return frame


def _fps_of(cap) -> Optional[float]:
    fps = cap.get(cv2.CAP_PROP_FPS)
    return float(fps) if fps and 0 < fps < 1000 else None


def _declared_frames(cap, file_bytes: int) -> int:
    """The frame count the container declares, believed up to one frame per MIN_FRAME_BYTES; 0 if none."""
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    if not (math.isfinite(count) and count > 0):
        return 0
    return int(min(count, file_bytes // MIN_FRAME_BYTES))


class VideoSource(FrameSource):
    """Frames of a video file (anything OpenCV/FFmpeg reads).

    ``index`` is the position in the file of the last frame returned (undecodable frames count, so it
    matches the file's own numbering, e.g. the bundled sample's ``sample.json``); it restarts at 0 on
    each loop.  A failed read is a corrupt frame while the file still declares frames after it
    (``expected_frames``, the container's count); past them, ``max_bad_frames`` failed reads in a row are
    the end of the file (the floor also covers files that declare no count, or too few).  Each corrupt
    stretch is one warning (on the first pass) and adds its length to ``skipped``; frames a file declares
    but does not deliver at its end (a truncated copy) are one warning.  ``realtime=True`` paces the
    frames to the file's fps, like a camera would deliver them; ``realtime=FPS`` to that rate.
    """

    def __init__(self, path: Union[str, os.PathLike], loop: bool = False, *, realtime: bool | float = False,
                 max_bad_frames: int = 25, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.name = str(self.path)
        self.loop = loop
        self.realtime = realtime
        self.max_bad_frames = max_bad_frames
        self._sleep, self._clock = sleep, clock
        if not self.path.exists():
            raise SourceError(self.path, "video file not found")
        if not self.path.is_file():
            raise SourceError(self.path, "not a regular file")
        self.skipped, self.passes, self._finished = 0, 0, False
        self._cap = self._open()
        self.fps = _fps_of(self._cap) if realtime is True or not realtime else float(realtime)
        self._next_due = None
        self._take_first("no decodable video frame")

    def _open(self):
        # One decoder thread: decoding runs beside inference (Prefetched), where FFmpeg's own threads
        # would take cores from the interpreter's and cost more CPU per frame (sample clip: 0.26 ms
        # single-threaded against 0.45 ms of CPU on two threads).
        _quiet_ffmpeg()
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, 1])
        if not cap.isOpened():
            cap.release()
            raise SourceError(self.path, "cannot open as a video (empty, cut short or not a video format?)")
        self.expected_frames = _declared_frames(cap, self.path.stat().st_size)
        self.index = -1
        return cap

    def _read_pass(self) -> Optional[np.ndarray]:
        """The next decodable frame of the current pass, or None at the end of the file."""
        bad = 0
        while True:
            ok, frame = self._cap.read()
            if ok and frame is not None:
                break
            bad += 1
            if bad > self.max_bad_frames and self.index + bad >= self.expected_frames:
                self._report_end()
                return None
        if bad:
            self.skipped += bad
            self._warn("%s: skipped %d undecodable frame(s), %d-%d; going on from frame %d",
                       self.name, bad, self.index + 1, self.index + bad, self.index + bad + 1)
        self.index += bad + 1
        return _as_bgr(frame)

    def _report_end(self) -> None:
        if self.index + 1 < self.expected_frames:
            self._warn("%s: no decodable frame after frame %d of the %d the file declares (truncated?)",
                       self.name, self.index, self.expected_frames)

    def _warn(self, *args) -> None:
        """A warning on the first pass; looping over the same damage again is only debug."""
        log.log(logging.WARNING if self.passes == 0 else logging.DEBUG, *args)

    def _next(self) -> Optional[np.ndarray]:
        frame = None if self._finished else self._read_pass()
        if frame is None and self.loop and self.index >= 0:
            self._cap.release()
            self._cap = self._open()
            self.passes += 1
            frame = self._read_pass()
        self._finished = frame is None  # reading on past the end would only report the end again
        return frame

    def read(self) -> Optional[np.ndarray]:
        frame = super().read()
        if frame is not None and self.realtime and self.fps:
            self._pace()
        return frame

    def _pace(self) -> None:
        now = self._clock()
        if self._next_due is not None and self._next_due > now:
            self._sleep(self._next_due - now)
            now = self._next_due
        self._next_due = now + 1.0 / self.fps

    def _release(self) -> None:
        self._cap.release()


class ImageDirSource(FrameSource):
    """The image files of a folder in sorted name order (hidden files ignored).

    Files OpenCV cannot read (corrupt, empty, not an image, or larger than OpenCV's pixel limit) are
    skipped with one warning each and counted in ``skipped``, and not tried again when looping.  With
    ``loop`` the folder is shown again and again; ``index`` is the position of the last returned file in
    ``files``.
    """

    def __init__(self, directory: Union[str, os.PathLike], loop: bool = False, *,
                 fps: Optional[float] = None):
        self.directory = Path(directory)
        self.name = str(self.directory)
        self.loop = loop
        self.fps = fps
        if not self.directory.is_dir():
            raise SourceError(self.directory, "image folder not found")
        self.files = sorted(p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith("."))
        if not self.files:
            raise SourceError(self.directory, "image folder is empty")
        self.index = -1
        self.skipped = 0
        self._take_first("no readable image in the folder")

    def _next(self) -> Optional[np.ndarray]:
        while self.files:
            if self.index + 1 >= len(self.files):
                if not self.loop:
                    return None
                self.index = -1
            self.index += 1
            path = self.files[self.index]
            frame, why = _imread(path)
            if frame is not None:
                return frame
            log.warning("%s: skipping image file %s: %s", self.name, path.name, why)
            self.skipped += 1
            del self.files[self.index]
            self.index -= 1
        return None


def _imread(path: Path) -> tuple[Optional[np.ndarray], str]:
    """(``path`` as a BGR image within the pixel bound (`runtime.images`), "") or (None, why not)."""
    try:
        frame = read_image(path)
    except BadInput as e:
        return None, e.reason
    return frame, "" if frame is not None else "unreadable"


class _Picamera2Capture:
    """Adapter giving picamera2 the small part of the ``cv2.VideoCapture`` API the camera source uses."""

    def __init__(self, width: int, height: int):
        from picamera2 import Picamera2  # lazy: only on a Raspberry Pi with the camera stack

        self._cam = Picamera2()
        # libcamera's "RGB888" is B, G, R in memory: already OpenCV's order.
        config = self._cam.create_video_configuration(main={"size": (width, height), "format": "RGB888"})
        self._cam.configure(config)
        self._cam.start()

    def isOpened(self) -> bool:
        return True

    def read(self):
        return True, self._cam.capture_array()

    def get(self, prop) -> float:
        return 0.0

    def release(self) -> None:
        self._cam.stop()
        self._cam.close()


class CameraSource(FrameSource):
    """A live camera: OpenCV ``VideoCapture`` (V4L2 on Linux) or, with ``picamera2=True`` and index 0,
    a Raspberry Pi camera module through ``picamera2``.

    ``index`` is a device number or a device path such as ``/dev/video2``. If a read fails the camera is
    released and reopened after ``backoff[0]`` seconds, doubling up to ``backoff[1]``, for as long as it
    takes (``read`` blocks meanwhile; ``close()`` from another thread ends the wait). ``sleep`` is
    injectable for tests.
    """

    live = True

    def __init__(self, index: Union[int, str] = 0, width: int = 640, height: int = 480, *,
                 picamera2: bool = False, backoff: tuple = (0.5, 8.0),
                 sleep: Callable[[float], None] = time.sleep):
        self.index = int(index) if str(index).isdigit() else index
        self.width, self.height = width, height
        self.use_picamera2 = picamera2 and self.index == 0
        self.backoff = backoff
        self._sleep = sleep
        self.name = f"camera {self.index}" + (" (picamera2)" if self.use_picamera2 else "")
        self.reconnects = 0
        if isinstance(self.index, str) and not os.path.exists(self.index):
            raise SourceError(self.index, "camera device not found")
        try:
            self._cap = self._open()
        except Exception as exc:  # picamera2 raises its own errors, OpenCV may raise cv2.error
            raise SourceError(self.name, f"cannot open: {exc}") from exc
        if self._cap is None:
            device = self.index if isinstance(self.index, str) else f"/dev/video{self.index}"
            raise SourceError(self.name, f"cannot open {device} (missing or busy?)")
        self.fps = _fps_of(self._cap)

    def _open(self):
        """An opened capture, or None."""
        if self.use_picamera2:
            return _Picamera2Capture(self.width, self.height)
        cap = cv2.VideoCapture(self.index)
        if not cap.isOpened():
            cap.release()
            return None
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        return cap

    def _grab(self) -> Optional[np.ndarray]:
        try:
            ok, frame = self._cap.read()
        except Exception as exc:  # a vanished device may raise instead of returning False
            log.debug("%s: read raised %r", self.name, exc)
            return None
        return _as_bgr(frame) if ok and frame is not None else None

    def _next(self) -> Optional[np.ndarray]:
        frame = None if self._cap is None else self._grab()
        delay, attempt = self.backoff[0], 0
        while frame is None and not self.closed:
            attempt += 1
            log.warning("%s: no frame; reconnecting in %.1f s (attempt %d)", self.name, delay, attempt)
            self._release()
            self._sleep(delay)
            delay = min(delay * 2, self.backoff[1])
            if self.closed:  # closed (from another thread) while we slept
                break
            try:
                self._cap = self._open()
            except Exception as exc:
                log.debug("%s: reopen failed: %r", self.name, exc)
            frame = self._grab() if self._cap is not None else None
            if frame is not None:
                self.reconnects += 1
                log.warning("%s: reconnected after %d attempt(s)", self.name, attempt)
        if self.closed:
            self._release()
            return None
        return frame

    def _release(self) -> None:
        cap, self._cap = getattr(self, "_cap", None), None
        if cap is not None:
            cap.release()


class Prefetched(FrameSource):
    """Another source read one frame ahead in a background thread, so decoding (or waiting for the
    camera) overlaps the caller's work on the current frame; OpenCV releases the GIL while it decodes.

    Same interface as the wrapped source (``name``, ``fps``, ``read``, ``close``, ``skipped``); an
    exception raised by its ``read`` is raised again by this ``read``.  A live source that gives no frame
    for ``stall_warning_s`` (a camera read that does not return, or a long reconnect) is one warning per
    wait; the wait goes on until a frame comes or the source is closed (SIGTERM, Ctrl-C).
    """

    _END = object()

    def __init__(self, source: FrameSource, depth: int = 1, *, stall_warning_s: float = 30.0):
        self.source, self.name, self.fps, self.live = source, source.name, source.fps, source.live
        self.stall_warning_s = stall_warning_s
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"read {source.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.source.read()
                self._put(self._END if frame is None else frame)
                if frame is None:
                    return
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    @property
    def skipped(self) -> int:
        return self.source.skipped

    def read(self) -> Optional[np.ndarray]:
        waiting_since, warned = time.monotonic(), False
        while not (self._done or self.closed):
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                warned = warned or self._warn_stall(time.monotonic() - waiting_since)
                continue
            if item is self._END:
                self._done = True
            elif isinstance(item, BaseException):
                self._done = True
                raise item
            else:
                return item
        return None

    def _warn_stall(self, waited: float) -> bool:
        """Warn (and say so) once a live source has given nothing for ``stall_warning_s``."""
        if not self.live or waited < self.stall_warning_s:
            return False
        log.warning("%s: no frame for %.1f s; still waiting (SIGTERM or Ctrl-C stops)", self.name, waited)
        return True

    def _release(self) -> None:
        self._stop.set()
        # A read in progress finishes first: releasing a capture under it is not safe.  A camera
        # waiting to reconnect may take longer; closing it below ends that wait.
        self._thread.join(timeout=2.0)
        self.source.close()


def open_source(camera: Union[int, str, None] = None, video: Union[str, os.PathLike, None] = None,
                images: Union[str, os.PathLike, None] = None, loop: bool = False,
                width: int = 640, height: int = 480, *, picamera2: bool = False,
                realtime: bool | float = False) -> FrameSource:
    """Open at most one of ``camera`` / ``video`` / ``images``; with none of them, the bundled sample clip.

    ``width``/``height`` are the capture size asked of a camera; files are delivered at their own size.
    """
    given = [name for name, value in (("camera", camera), ("video", video), ("images", images))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one frame source, not {' and '.join(given)}")
    if camera is not None:
        return CameraSource(camera, width, height, picamera2=picamera2)
    if images is not None:
        return ImageDirSource(images, loop=loop)
    if video is None:
        video = sample_path()
    return VideoSource(video, loop=loop, realtime=realtime)
