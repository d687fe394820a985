"""Live preview in a browser: a tiny MJPEG + JSON server on the standard library.

The producer (the streaming loop) calls :meth:`PreviewServer.publish` with each annotated BGR frame and
:meth:`PreviewServer.update_status` with a status dict; neither blocks on clients. Routes:

* ``GET /``            the page (``static/index.html``): the stream and the status, polled every 0.5 s;
* ``GET /stream.mjpg`` ``multipart/x-mixed-replace`` MJPEG, each client gets frames as they are published;
* ``GET /frame.jpg``   the latest frame (503 before the first one);
* ``GET /status``      JSON of the latest status plus ``published`` (frames published so far);
* ``GET /history``     JSON of the stream over time, for the page's charts: ``points`` [frame, fps,
  latency_ms, refolds] (at most ``HISTORY_POINTS``, thinned evenly as the stream goes on), ``samples``
  [frame, before, after] of the agreement samples (the last ``HISTORY_SAMPLES``), ``calibrated_at_frame``,
  and ``layer_shift``, the latest live Fig. 1 (per BN layer, uncalibrated and calibrated; `layer_shift`).

The page shows these status keys when present: ``model``, ``task``, ``source``, ``fps``, ``frames``,
``noise``, ``calibration`` (text), ``calibration_progress`` (0..1), ``result``; the whole dict is shown
as JSON too, and ``frames``, ``fps``, ``latency_ms``, ``refolds``, ``agreement`` and ``calibrated_at_frame``
feed ``/history``.  The page draws its charts itself (no external assets: the board may be offline). Device side: stdlib, numpy and OpenCV only. Serve on loopback unless you mean to expose it.

Limits, so clients cannot hold the board's threads or memory: at most ``max_clients`` connections are
served at once (each holds a thread).  When they are all taken, a new connection takes the slot of the
one that holds it without using it: the oldest still sending its request after ``HEAD_GRACE_S`` (a
viewer's request arrives in milliseconds), else the stream client stalled longest, blocked on a send for
over ``stall_s``; only when every connection is busy being served is the new one answered
``503 Service Unavailable``, at once, from the accepting thread.  The request line and headers must arrive within
``head_deadline_s`` in total (a client sending one byte every few seconds is dropped then) and within
``HEAD_LIMIT`` bytes; a client that stops reading is dropped once a send has waited ``send_timeout_s``;
the listen backlog (``BACKLOG``) lets 50 clients connect at once.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

log = logging.getLogger(__name__)

__all__ = ["PreviewServer"]

BOUNDARY = "edgecbnframe"
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_CLIENTS = 64  # connections served at once: 50 viewers fit; each holds a thread
BACKLOG = 128  # connections the kernel queues before the server accepts them
HEAD_DEADLINE_S = 5.0  # for the whole request line and headers, not per byte
HEAD_LIMIT = 65536  # bytes of request line and headers (cookies for 127.0.0.1 are shared by every port)
SEND_TIMEOUT_S = 10.0  # a client that reads nothing for this long is dropped
HEAD_GRACE_S = 0.5  # a connection still sending its request after this long gives its slot to a new one
STALL_S = 2.0  # a stream client blocked on one send this long gives its slot to a new one
HISTORY_POINTS = 600  # chart points kept: when full, every other one is dropped (even thinning)
HISTORY_SAMPLES = 500  # agreement samples kept (the newest)
_BUSY_TEXT = b"too many preview clients, retry\r\n"
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Retry-After: 5\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT))


def _jsonable(value):
    """``json.dumps`` fallback: numpy scalars and arrays, paths, anything else as text."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _read_head(sock, deadline: float) -> tuple[bytes, HTTPStatus | None]:
    """(the request line and headers, and whatever came with them; None), read against one deadline for
    all of it.  (b"", 414 or 431) when the request line or the headers pass HEAD_LIMIT; (b"", None) when the
    client is too slow or goes away (the handler then just closes)."""
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        remaining = deadline - time.monotonic()
        if len(head) > HEAD_LIMIT:
            line_ended = b"\n" in head[:HEAD_LIMIT]
            return b"", (HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE if line_ended else HTTPStatus.REQUEST_URI_TOO_LONG)
        if remaining <= 0:
            return b"", None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(4096)
        except OSError:  # the deadline passed (TimeoutError) or the connection broke
            return b"", None
        if not chunk:
            return b"", None
        head += chunk
    return head, None


def _too_large(sock, status: HTTPStatus) -> None:
    """Answer `status` (414, 431) and stop reading: what else came is dropped unread, then the connection
    is closed by the handler."""
    text = f"{status.phrase}: the preview takes requests of at most {HEAD_LIMIT} bytes\r\n".encode()
    with contextlib.suppress(OSError):
        sock.sendall(b"HTTP/1.0 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (status.value, status.phrase.encode(), len(text), text))
        sock.setblocking(False)
        while sock.recv(65536):  # closing on unread bytes would reset the connection before the answer arrives
            pass


class _Handler(BaseHTTPRequestHandler):
    server_version = "edge-cbn-preview"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the head is read by _read_head instead: a per-recv timeout is no deadline
        head, too_large = _read_head(self.connection, time.monotonic() + self.server.head_deadline_s)
        self.server.mark(self.connection, "request")
        if too_large is not None:
            _too_large(self.connection, too_large)
        self.rfile = io.BytesIO(head)
        self.connection.settimeout(self.server.send_timeout_s)

    def log_message(self, fmt, *args) -> None:  # quiet: requests go to debug logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        preview: PreviewServer = self.server.preview
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                self._send(preview.page, "text/html; charset=utf-8")
            elif path == "/status":
                self._send(preview.status_json().encode(), "application/json")
            elif path == "/history":
                self._send(preview.history_json().encode(), "application/json")
            elif path == "/frame.jpg":
                jpeg = preview.latest()[1]
                if jpeg is None:
                    self._send(b"no frame yet\n", "text/plain", HTTPStatus.SERVICE_UNAVAILABLE)
                else:
                    self._send(jpeg, "image/jpeg")
            elif path == "/stream.mjpg":
                self._stream(preview)
            else:
                self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stopped reading

    def _stream(self, preview: "PreviewServer") -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        seq = 0
        while not preview.closed:
            self.server.mark(self.connection, "stream")  # not blocked on a send: in use
            seq, jpeg = preview.wait_frame(seq, timeout=1.0)
            if jpeg is None:
                continue
            self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                             f"Content-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n")
            self.wfile.flush()


class _Connection:
    """A served connection: its phase ("head", "request", "stream") and when it last showed it was in use."""

    def __init__(self, sock, now: float):
        self.sock, self.phase, self.since, self.evicted = sock, "head", now, False


class _Server(ThreadingHTTPServer):
    """One thread per connection, up to ``max_clients``; beyond them a slot taken from a connection that
    does not use it, else a 503, and no thread."""

    request_queue_size = BACKLOG

    def __init__(self, address, preview: "PreviewServer", max_clients: int, head_deadline_s: float,
                 send_timeout_s: float, stall_s: float):
        self.preview, self.max_clients = preview, max_clients
        self.head_deadline_s, self.send_timeout_s, self.stall_s = head_deadline_s, send_timeout_s, stall_s
        self.clients = self.refused = self.evicted = 0
        self._count = threading.Lock()
        self._connections: dict[int, _Connection] = {}  # by the socket's id
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        with self._count:
            victim = self._victim(time.monotonic()) if self.clients >= self.max_clients else None
            full = self.clients >= self.max_clients and victim is None
            self.clients += not full
            self.refused += full
            if not full:
                self._connections[id(request)] = _Connection(request, time.monotonic())
        if full:
            self._refuse(request)
            return
        if victim is not None:
            self._evict(victim)
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._leave(request)
            raise

    def _victim(self, now: float) -> _Connection | None:
        """The connection to give its slot up: the oldest still sending its request after HEAD_GRACE_S,
        else the stream client blocked on a send the longest past `stall_s`; None when all are in use."""
        live = [c for c in self._connections.values() if not c.evicted]
        heads = [c for c in live if c.phase == "head" and now - c.since > HEAD_GRACE_S]
        stalled = [c for c in live if c.phase == "stream" and now - c.since > self.stall_s]
        return min(heads or stalled, key=lambda c: c.since, default=None)

    def _evict(self, victim: _Connection) -> None:
        """End `victim`'s connection: its thread's read or send fails at once, and it leaves."""
        victim.evicted = True
        self.evicted += 1
        with contextlib.suppress(OSError):
            victim.sock.shutdown(socket.SHUT_RDWR)

    def mark(self, sock, phase: str) -> None:
        """The connection of `sock` is in `phase`, in use now."""
        connection = self._connections.get(id(sock))
        if connection is not None:
            connection.phase, connection.since = phase, time.monotonic()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._leave(request)

    def _leave(self, request) -> None:
        with self._count:
            self.clients -= 1
            self._connections.pop(id(request), None)

    def _refuse(self, sock) -> None:
        """503 from the accepting thread, which nothing here can block."""
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.recv(HEAD_LIMIT)  # what came already: closing on unread bytes resets the connection
        with contextlib.suppress(OSError):
            sock.send(BUSY)
        self.shutdown_request(sock)

    def handle_error(self, request, client_address) -> None:
        log.debug("preview: error serving %s", client_address, exc_info=True)  # not a traceback on stderr


class _History:
    """The stream over time, bounded: chart points thinned evenly (every `step`-th status once full, the
    kept ones halved), the newest agreement samples, the frame the model became calibrated."""

    def __init__(self):
        self.points: list[list] = []
        self.samples: collections.deque = collections.deque(maxlen=HISTORY_SAMPLES)
        self.step, self.seen, self.calibrated_at, self.layer_shift = 1, 0, None, None

    def add(self, status: dict) -> None:
        frame = status.get("frames")
        if not isinstance(frame, (int, float)):
            return
        sample = status.get("agreement")
        if isinstance(sample, dict):
            self.samples.append([sample.get("frame"), sample.get("before"), sample.get("after")])
        self.calibrated_at = status.get("calibrated_at_frame", self.calibrated_at)
        self.layer_shift = status.get("layer_shift") or self.layer_shift
        self.seen += 1
        if self.seen % self.step:
            return
        self.points.append([frame, status.get("fps"), status.get("latency_ms"), status.get("refolds")])
        if len(self.points) >= HISTORY_POINTS:
            self.points, self.step = self.points[1::2], self.step * 2

    def as_dict(self) -> dict:
        return {"points": self.points, "samples": list(self.samples), "calibrated_at_frame": self.calibrated_at,
                "layer_shift": self.layer_shift}


class PreviewServer:
    """HTTP preview on ``host:port`` (``port=0``: a free port; see ``.port`` and ``.url``), served by a
    daemon thread from construction until :meth:`close`. Also a context manager.  ``clients`` is the
    number of connections served now, ``refused`` the number answered 503 so far, ``evicted`` the number
    that gave their slot to a new connection."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, quality: int = 80, *,
                 max_clients: int = MAX_CLIENTS, head_deadline_s: float = HEAD_DEADLINE_S,
                 send_timeout_s: float = SEND_TIMEOUT_S, stall_s: float = STALL_S):
        self.quality = int(quality)
        self.page = PAGE.read_bytes()
        self._cond = threading.Condition()
        self._seq = 0
        self._jpeg: Optional[bytes] = None
        self._status: dict = {}
        self._history = _History()
        self.closed = False
        self._httpd = _Server((host, port), self, max_clients, head_deadline_s, send_timeout_s, stall_s)
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"preview:{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def clients(self) -> int:
        return self._httpd.clients

    @property
    def refused(self) -> int:
        return self._httpd.refused

    @property
    def evicted(self) -> int:
        return self._httpd.evicted

    @property
    def published(self) -> int:
        """Frames published so far."""
        return self._seq

    def publish(self, frame_bgr: np.ndarray) -> None:
        """JPEG-encode ``frame_bgr`` and make it the latest frame; wakes the stream clients."""
        ok, buf = cv2.imencode(".jpg", frame_bgr, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise ValueError(f"cannot JPEG-encode a frame of shape {np.shape(frame_bgr)}")
        with self._cond:
            self._jpeg = buf.tobytes()
            self._seq += 1
            self._cond.notify_all()

    def update_status(self, status: dict) -> None:
        """Replace the status served at ``/status`` (numpy values are converted)."""
        clean = json.loads(json.dumps(dict(status), default=_jsonable))
        with self._cond:
            self._status = clean
            self._history.add(clean)

    def status_json(self) -> str:
        with self._cond:
            return json.dumps({**self._status, "published": self._seq})

    def history_json(self) -> str:
        """``/history``: the stream over time (see the module)."""
        with self._cond:
            return json.dumps(self._history.as_dict())

    def latest(self):
        """``(sequence number, JPEG bytes or None)`` of the latest frame."""
        with self._cond:
            return self._seq, self._jpeg

    def wait_frame(self, after: int, timeout: float = 1.0):
        """Wait up to ``timeout`` s for a frame newer than sequence number ``after``; returns
        ``(seq, jpeg)``, with ``jpeg`` None if nothing new came (or the server closed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > after or self.closed, timeout)
            if self._seq > after and not self.closed:
                return self._seq, self._jpeg
            return after, None

    def close(self) -> None:
        """Stop serving; stream clients are let go within a second."""
        if self.closed:
            return
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
