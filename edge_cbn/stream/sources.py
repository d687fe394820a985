"""Frame sources: camera, video file, network stream, image folder, or the bundled sample clip.

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
* a camera or a network stream whose read fails is reopened with exponential backoff (0.5 s doubling up
  to 8 s by default) until it comes back or the source is closed, and the frames the outage cost are
  counted (:class:`LiveSource`); a read that does not return is reported by :class:`Prefetched`
  (``stall_warning_s``).

A network stream (``rtsp://``, ``rtsps://``, ``http(s)://``: MJPEG over HTTP, HLS) is named by its URL's
scheme; anything else is a path.  Its password never leaves :func:`mask_url` (``user:***@host``): the
source's ``name`` and every message carry the masked URL.

FFmpeg's own log (hundreds of "error while decoding MB" lines for one damaged stretch) is kept off the
terminal unless ``--debug`` (``EDGE_CBN_DEBUG``): the warnings above say what was skipped.

Device side: numpy and OpenCV only. ``picamera2`` is imported lazily, only when asked for.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import re
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
    "LiveSource",
    "NetworkSource",
    "ImageDirSource",
    "Prefetched",
    "open_source",
    "debug_enabled",
    "is_url",
    "mask_url",
]

# A declared frame count is believed only up to one frame per this many bytes of the file (the smallest
# framing a video frame has: an MP4 size entry, an Annex-B start code), so a forged header cannot make the
# end of a file look like an endless corrupt stretch (failed reads at the end cost about 1 us each).
MIN_FRAME_BYTES = 4

# The schemes read as network streams, through OpenCV's FFmpeg backend.
NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https")
# "scheme://": a URL (two letters at least, so a Windows drive "C://" stays a path).
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


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


def is_url(value) -> bool:
    """Whether ``value`` names a network stream rather than a path: a string starting ``scheme://``.

    Args:
        value: a ``--video``/``--camera`` value (a string, a number or a path).

    Returns:
        True for a ``str`` that starts with a URL scheme (supported or not: :class:`NetworkSource` says which
        it reads); False otherwise (a ``Path`` is never a URL).
    """
    return isinstance(value, str) and _URL.match(value) is not None


def mask_url(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***`` (``rtsp://user:***@host/x``).

    Args:
        url: a URL, as given (nothing else in it is changed: no normalisation).

    Returns:
        The URL to print: unchanged when it carries no password.
    """
    match = _URL.match(url)
    if not match:
        return url
    start = match.end()
    end = min((i for i in (url.find(c, start) for c in "/?#") if i >= 0), default=len(url))
    userinfo, at, host = url[start:end].rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not (at and colon):
        return url
    return f"{url[:start]}{user}:***@{host}{url[end:]}"


def _refuse_url(value, what: str) -> None:
    """A URL given to a path or device source: one line saying what opens it."""
    if is_url(value):
        raise SourceError(mask_url(value), f"a network stream, not a {what}: open it with NetworkSource "
                                           "(or open_source(video=URL), `--video URL`)")


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

    def _take_first(self, nothing: str, read: Optional[Callable[[], Optional[np.ndarray]]] = None) -> None:
        self._first = (read or self._next)()
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
        _refuse_url(path, "video file")  # Path() would fold its "//" and look for a file
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


class LiveSource(FrameSource):
    """A live source, camera or network stream: it has no end, and a failed read is an outage.

    On a failed read the capture is released and reopened after ``backoff[0]`` seconds, doubling up to
    ``backoff[1]``, for as long as it takes (``read`` blocks meanwhile; ``close()`` from another thread
    ends the wait).  Each outage adds the frames it cost to ``skipped``: its length (from the read that
    failed to the frame back) times ``fps``, at least one (one when the fps is unknown); ``reconnects``
    counts the outages that ended.  Subclasses set ``name`` and implement :meth:`_open`; ``sleep`` and
    ``clock`` are injectable for tests.
    """

    live = True

    def _start_live(self, backoff: tuple, sleep: Callable[[float], None], clock: Callable[[], float]) -> None:
        self.backoff, self._sleep, self._clock = backoff, sleep, clock
        self.reconnects, self.skipped, self._cap = 0, 0, None
        # Held while the reader uses the capture: a close() from another thread (SIGTERM) must not release
        # it under a read or an open in progress (FFmpeg would crash); the reader releases it after.
        self._in_use = threading.Lock()

    def _open(self):
        """An opened capture, or None (may raise)."""
        raise NotImplementedError

    def _grab(self) -> Optional[np.ndarray]:
        with self._in_use:
            if self._cap is None or self.closed:
                return None
            try:
                ok, frame = self._cap.read()
            except Exception as exc:  # a vanished device may raise instead of returning False
                log.debug("%s: read raised %r", self.name, exc)
                return None
        return _as_bgr(frame) if ok and frame is not None else None

    def _reopen(self) -> None:
        try:
            cap = self._open()
        except Exception as exc:
            log.debug("%s: reopen failed: %r", self.name, exc)
            return
        with self._in_use:
            if self.closed and cap is not None:  # closed while it opened
                cap.release()
            elif not self.closed:
                self._cap = cap

    def _next(self) -> Optional[np.ndarray]:
        started = self._clock()
        frame = self._grab()
        if frame is None and not self.closed:
            frame = self._reconnect(started)
        if self.closed:
            self._release()
            return None
        return frame

    def _reconnect(self, started: float) -> Optional[np.ndarray]:
        """Reopen with backoff until a frame comes (it is returned) or the source is closed (None)."""
        delay, attempt, frame = self.backoff[0], 0, None
        while frame is None and not self.closed:
            attempt += 1
            self._announce(delay, attempt)
            self._release()
            self._sleep(delay)
            delay = min(delay * 2, self.backoff[1])
            if self.closed:  # closed (from another thread) while we slept
                break
            self._reopen()
            frame = self._grab()
        if frame is not None:
            self._count_outage(self._clock() - started, attempt)
        return frame

    def _announce(self, delay: float, attempt: int) -> None:
        """Say that a reconnect is coming (a camera: a warning each attempt)."""
        log.warning("%s: no frame; reconnecting in %.1f s (attempt %d)", self.name, delay, attempt)

    def _count_outage(self, seconds: float, attempts: int) -> None:
        lost = max(1, round(seconds * self.fps)) if self.fps else 1
        self.skipped += lost
        self.reconnects += 1
        log.warning("%s: reconnected after %d attempt(s), %.1f s without frames (%d frame(s) lost)",
                    self.name, attempts, seconds, lost)

    def _release(self) -> None:
        if not self._in_use.acquire(blocking=False):
            return  # the reader is in a read or an open: it releases the capture when it sees closed
        try:
            cap, self._cap = self._cap, None
            if cap is not None:
                cap.release()
        finally:
            self._in_use.release()


class CameraSource(LiveSource):
    """A live camera: OpenCV ``VideoCapture`` (V4L2 on Linux) or, with ``picamera2=True`` and index 0,
    a Raspberry Pi camera module through ``picamera2``.

    ``index`` is a device number or a device path such as ``/dev/video2`` (a URL is a
    :class:`NetworkSource`). A failed read reconnects with backoff (:class:`LiveSource`), one warning per
    attempt.
    """

    def __init__(self, index: Union[int, str] = 0, width: int = 640, height: int = 480, *,
                 picamera2: bool = False, backoff: tuple = (0.5, 8.0),
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        _refuse_url(index, "camera device")
        self.index = int(index) if str(index).isdigit() else index
        self.width, self.height = width, height
        self.use_picamera2 = picamera2 and self.index == 0
        self.name = f"camera {self.index}" + (" (picamera2)" if self.use_picamera2 else "")
        self._start_live(backoff, sleep, clock)
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


class NetworkSource(LiveSource):
    """A network stream through OpenCV's FFmpeg backend: ``rtsp://``, ``rtsps://``, ``http(s)://`` (MJPEG
    over HTTP, HLS ``.m3u8``).  The URL reaches FFmpeg as given; ``name`` is it with the password masked.

    It is live, like a camera: no end; a failed read or a dropped connection reconnects with backoff
    (:class:`LiveSource`), with one warning when the stream is lost ("lost URL, reconnecting in 0.5 s"),
    one when it is back, and the outage counted in ``skipped``.  At open the first connection and the
    first frame must come (``open_timeout``, then ``read_timeout`` seconds) or it is one
    :class:`SourceError` ("URL: cannot connect (why)"); a read that gets nothing for ``read_timeout``
    seconds is an outage.  Frames come at the stream's own size.

    Args:
        url: the stream's URL, passed to FFmpeg unchanged (``rtsp://user:pass@host/path`` carries credentials).
        open_timeout: seconds a connection may take (OpenCV's ``CAP_PROP_OPEN_TIMEOUT_MSEC``), at open and
            at each reconnect.
        read_timeout: seconds a read may wait for a frame (``CAP_PROP_READ_TIMEOUT_MSEC``).
        backoff: (first, longest) wait before a reconnect, seconds; it doubles per attempt.
        sleep, clock: injectable for tests.

    Raises:
        SourceError: an unsupported scheme, or no connection or no frame at open.
    """

    def __init__(self, url: str, *, open_timeout: float = 10.0, read_timeout: float = 5.0,
                 backoff: tuple = (0.5, 8.0), sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.url, self.name = url, mask_url(url)
        self.open_timeout, self.read_timeout = open_timeout, read_timeout
        self._start_live(backoff, sleep, clock)
        scheme = _URL.match(url).group(1).lower() if is_url(url) else ""
        if scheme not in NETWORK_SCHEMES:
            raise SourceError(self.name, f"not a network stream URL (read: {', '.join(NETWORK_SCHEMES)})")
        started = clock()
        try:
            self._cap = self._open()
        except Exception as exc:  # cv2.error; its text may quote the URL
            raise SourceError(self.name, f"cannot connect ({self._masked(str(exc))})") from None
        if self._cap is None:
            raise SourceError(self.name, f"cannot connect ({self._why(clock() - started)})")
        self.fps = _fps_of(self._cap)
        self._take_first(f"cannot connect (connected, but no frame within {read_timeout:g} s)", self._grab)

    def _open(self):
        """An opened capture, or None."""
        _quiet_ffmpeg()
        # One decoder thread, as for a file (VideoSource._open): decoding runs beside inference.
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, round(self.open_timeout * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, round(self.read_timeout * 1000), cv2.CAP_PROP_N_THREADS, 1]
        with opencv_quiet():  # "backend ... can't be used to capture by name" at every failed reconnect
            cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _why(self, waited: float) -> str:
        """Why a first connection failed, as far as OpenCV lets us tell."""
        if waited >= 0.9 * self.open_timeout:
            return f"no answer within {self.open_timeout:g} s"
        return "connection refused, no such stream, not authorised, or not a stream FFmpeg reads"

    def _masked(self, text: str) -> str:
        return text.replace(self.url, self.name)

    def _announce(self, delay: float, attempt: int) -> None:
        """One warning per outage; the attempts after the first are debug (Prefetched warns of a long wait)."""
        if attempt == 1:
            log.warning("lost %s, reconnecting in %.1f s", self.name, delay)
        else:
            log.debug("%s: still unreachable; reconnecting in %.1f s (attempt %d)", self.name, delay, attempt)


@contextlib.contextmanager
def opencv_quiet():
    """OpenCV's own log at ERROR for the block, unless --debug (`debug_enabled`)."""
    logging_ = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_ is None or debug_enabled():
        yield
        return
    old = logging_.getLogLevel()
    logging_.setLogLevel(logging_.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging_.setLogLevel(old)


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

    A ``video`` or ``camera`` that is a URL (:func:`is_url`) opens a :class:`NetworkSource` (``loop`` does
    not apply: it has no end).  ``width``/``height`` are the capture size asked of a camera device; files
    and network streams are delivered at their own size.

    Args:
        camera: a camera index, device path or stream URL.
        video: a video file or stream URL.
        images: a folder of images.
        loop: start a file or folder again at its end.
        width, height: the capture size asked of a camera device.
        picamera2: camera 0 through picamera2.
        realtime: pace a video file to its fps (True) or to this fps (`VideoSource`).

    Returns:
        The opened source (its first frame read, for a file or a network stream).

    Raises:
        SourceError: a source that cannot be used (one line naming it, a URL's password masked).
        ValueError: more than one source given.
    """
    given = [name for name, value in (("camera", camera), ("video", video), ("images", images))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one frame source, not {' and '.join(given)}")
    url = next((value for value in (camera, video) if is_url(value)), None)
    if url is not None:
        return NetworkSource(url)
    if camera is not None:
        return CameraSource(camera, width, height, picamera2=picamera2)
    if images is not None:
        return ImageDirSource(images, loop=loop)
    if video is None:
        video = sample_path()
    return VideoSource(video, loop=loop, realtime=realtime)
