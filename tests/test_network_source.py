"""Network frame sources (`--video URL`): MJPEG over HTTP from a local server made here (no internet),
reconnects when the server goes away and comes back, outages counted, passwords masked, one-line errors
for a stream that cannot be reached, and the stream CLI on a URL."""
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edge_cbn.stream.command import main
from edge_cbn.stream.sources import NetworkSource, SourceError, VideoSource, is_url, mask_url, open_source
from media import FakeCapture
from preview_poll import free_port
from test_stream import export_tiny

W, H = 64, 48
FAST = dict(open_timeout=2.0, read_timeout=2.0, backoff=(0.1, 0.4))  # a test's reconnects in tenths of a second


class MjpegServer:
    """`GET /stream.mjpg` as `multipart/x-mixed-replace` JPEG parts (flat frames of gray `level`) at
    `fps`, on 127.0.0.1; `stop()` drops every connection, `start()` serves again on the same port,
    `paused` holds the connections open without sending anything."""

    def __init__(self, level=40, fps=50):
        self.level, self.fps, self.port, self.paused = level, fps, 0, threading.Event()

    def url(self, credentials=""):
        return f"http://{credentials}127.0.0.1:{self.port}/stream.mjpg"

    def start(self):
        stop, server = threading.Event(), self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/stream.mjpg":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                while not stop.wait(1 / server.fps):
                    if not server.paused.is_set() and not self.send_frame():
                        return

            def send_frame(self):
                jpeg = cv2.imencode(".jpg", np.full((H, W, 3), server.level, np.uint8))[1].tobytes()
                try:
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%b\r\n"
                                     % (len(jpeg), jpeg))
                    return True
                except OSError:  # the client went away
                    return False

            def log_message(self, *args):
                pass

        self._stop = stop
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)  # reuses the port (SO_REUSEADDR)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self):
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = MjpegServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(export_tiny(tmp_path_factory.mktemp("model") / "tiny.tflite"))


def messages(caplog, text, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


def test_mjpeg_over_http_yields_frames_of_the_streams_size(server):
    with open_source(video=server.url()) as src:
        assert isinstance(src, NetworkSource) and src.live and src.name == server.url()
        frames = [src.read() for _ in range(5)]
    assert all(f.shape == (H, W, 3) and f.dtype == np.uint8 for f in frames)
    assert abs(float(frames[-1].mean()) - server.level) < 3
    assert src.read() is None  # closed


def test_a_dropped_stream_reconnects_and_counts_the_outage(server, caplog):
    caplog.set_level(logging.DEBUG, logger="edge_cbn.stream.sources")
    src = NetworkSource(server.url("viewer:secret@"), **FAST)
    assert [src.read().shape for _ in range(3)] == [(H, W, 3)] * 3
    server.stop()
    server.level = 200  # the restarted server's frames tell themselves apart
    restart = threading.Timer(0.7, server.start)
    restart.start()
    started = time.monotonic()
    frame = src.read()
    while frame is not None and frame.mean() < 120 and time.monotonic() - started < 20:
        frame = src.read()  # what FFmpeg had buffered before the drop, then the restarted server's frames
    restart.join()
    assert frame is not None and frame.mean() > 120 and src.read().shape == (H, W, 3)
    src.close()
    name = "http://viewer:***@127.0.0.1:%d/stream.mjpg" % server.port
    assert messages(caplog, "lost http") == [f"lost {name}, reconnecting in 0.1 s"]
    back = messages(caplog, "reconnected")
    assert len(back) == 1 and back[0].startswith(f"{name}: reconnected after ")
    assert src.reconnects == 1 and src.skipped >= 1 and back[0].endswith(f"({src.skipped} frame(s) lost)")
    assert len(messages(caplog, "still unreachable", logging.DEBUG)) >= 1  # later attempts: debug only
    assert "secret" not in caplog.text


def test_outage_is_its_length_times_the_fps(monkeypatch, caplog):
    """Deterministic: a fake capture (3 frames, two failed reopens, then frames) and a fake clock."""
    now = [0.0]
    FakeCapture.script(3, None, None, 10 ** 6)
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    src = NetworkSource("rtsp://cam.local:554//live", sleep=lambda s: now.__setitem__(0, now[0] + s),
                        clock=lambda: now[0])
    assert len([src.read() for _ in range(5)]) == 5 and src.fps == 30.0
    assert now[0] == 0.5 + 1.0 + 2.0 and src.skipped == 105 and src.reconnects == 1  # 3.5 s at 30 fps
    assert len(messages(caplog, "lost rtsp")) == 1 and len(messages(caplog, "reconnected")) == 1
    for capture in FakeCapture.instances:  # the URL as given ("//" kept), through FFmpeg
        assert capture.opened_with[:2] == ("rtsp://cam.local:554//live", cv2.CAP_FFMPEG)


def test_passwords_are_masked_and_an_unreachable_stream_is_one_line(server):
    assert mask_url("rtsp://admin:p@ss:w0rd@10.0.0.5:554/h264?x=1") == "rtsp://admin:***@10.0.0.5:554/h264?x=1"
    assert mask_url("rtsp://admin@host/x") == "rtsp://admin@host/x"  # no password: nothing to hide
    assert mask_url("http://host/a:b@c") == "http://host/a:b@c"  # an "@" in the path is no user info
    with NetworkSource(server.url("me:hunter2@"), **FAST) as src:
        assert src.name == server.url("me:***@") and "hunter2" not in repr(src)
    url = f"http://me:hunter2@127.0.0.1:{free_port()}/stream.mjpg"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(SourceError) as error:
        NetworkSource(url, open_timeout=1.0)
    message = str(error.value)
    assert time.monotonic() - started < 2 and "\n" not in message and "hunter2" not in message
    assert message.startswith(f"{mask_url(url)}: cannot connect (")


def test_urls_are_told_from_paths():
    assert is_url("rtsp://h/s") and is_url("HTTPS://h/s.m3u8") and is_url("ftp://h/x")
    assert not any(is_url(v) for v in ("clip.mp4", "C://clip.mp4", "/dev/video2", 0, None))
    with pytest.raises(SourceError, match=r"^ftp://u:\*\*\*@h/x: not a network stream URL \(read: rtsp, rtsps"):
        open_source(video="ftp://u:pw@h/x")
    with pytest.raises(SourceError, match=r"^rtsp://h//s: a network stream, not a video file"):
        VideoSource("rtsp://h//s")  # refused as a URL, its "//" kept, not looked up as a file


def test_close_during_a_stalled_read_leaves_the_capture_to_the_reader(server):
    """SIGTERM while the server sends nothing: close() returns at once and does not release the capture
    under the read in progress (FFmpeg would crash); the reader releases it when its read gives up."""
    src = NetworkSource(server.url(), **FAST)
    reader = threading.Thread(target=lambda: list(src), daemon=True)  # reads until the source is closed
    reader.start()
    server.paused.set()
    time.sleep(0.5)  # what FFmpeg had buffered is read: the reader now waits inside FFmpeg's read
    started = time.monotonic()
    src.close()
    assert time.monotonic() - started < 0.1 and src.closed and src._cap is not None
    reader.join(5)
    assert not reader.is_alive() and src._cap is None and src.read() is None


def test_stream_cli_on_an_http_url(server, tiny, tmp_path):
    log = tmp_path / "s.jsonl"
    r = CliRunner().invoke(main, ["--model", tiny, "--video", server.url("u:pw@"), "--frames", "20", "--headless",
                                  "--log", str(log)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads(log.read_text().splitlines()[-1])["summary"]
    assert summary["frames"] == 20 and summary["source"] == server.url("u:***@")
    assert "pw@" not in r.output and "pw@" not in log.read_text()
    r = CliRunner().invoke(main, ["--model", tiny, "--camera", server.url(), "--frames", "3", "--headless"],
                           catch_exceptions=False)  # --camera URL: the same network source
    assert r.exit_code == 0 and json.loads(r.stdout.splitlines()[-1])["summary"]["frames"] == 3


@pytest.mark.parametrize("flag", ["--video", "--camera"])
def test_stream_cli_on_a_closed_rtsp_port_is_one_line_with_the_url_unchanged(tiny, flag):
    url = f"rtsp://127.0.0.1:{free_port()}//live/main"
    r = CliRunner().invoke(main, ["--model", tiny, flag, url, "--headless"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [f"Error: {url}: cannot connect (connection refused, no such stream, "
                                             "not authorised, or not a stream FFmpeg reads)"]
