"""Overlays draw where they should; the preview server serves status, frames and an MJPEG stream."""
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from edge_cbn.stream import overlay
from edge_cbn.stream.overlay import FpsCounter, draw_classification, draw_detections, draw_hud, draw_segmentation
from edge_cbn.stream.preview import PreviewServer


def gray(h=480, w=640, level=100):
    return np.full((h, w, 3), level, np.uint8)


def changed(a, b):
    return np.any(a != b, axis=-1)


def test_voc_palette():
    palette = overlay.voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert len({tuple(c) for c in palette[:21]}) == 21


def test_noise_text_is_ascii():
    assert overlay.noise_text("relative", 0.05, 0) == "noise relative eta=0.05 seed 0"
    assert overlay.noise_text("relative", 0.05) == "noise relative eta=0.05"
    assert overlay.noise_text("relative", 0.0, 3) == overlay.noise_text() == "noise off"


def test_classification_draws_top_left_only():
    frame = gray()
    out = draw_classification(frame, [("tabby cat", 0.81), ("tiger cat", 0.12)])
    assert out is frame  # in place
    diff = changed(frame, gray())
    assert diff[:60, :200].mean() > 0.3  # text on a darkened panel
    assert not diff[100:, :].any() and not diff[:, 320:].any()


def test_detections_box_in_class_colour():
    frame = gray()
    draw_detections(frame, np.array([[100, 150, 300, 400]]), [0.9], [2], labels=["a", "b", "car"])
    color = overlay.class_color(2)
    assert tuple(frame[300, 100]) == color and tuple(frame[400, 200]) == color  # left and bottom edges
    assert not changed(frame, gray())[200:390, 110:290].any()  # inside the box, below the tag
    assert changed(frame, gray())[130:150, 100:160].any()  # the "car 0.90" tag above the box
    assert overlay.class_color(2) != overlay.class_color(3)


def test_segmentation_blends_voc_colours_except_background():
    frame = gray()
    mask = np.zeros((120, 160), np.int64)
    mask[:60, :80] = 1  # top-left quarter: class 1, VOC RGB (128, 0, 0)
    draw_segmentation(frame, mask, alpha=0.5)
    assert frame[100, 100].tolist() == [50, 50, 114]  # BGR: half gray, half (0, 0, 128)
    assert frame[400, 500].tolist() == [100, 100, 100]  # background untouched
    everywhere = draw_segmentation(gray(), mask, alpha=0.5, background=None)
    assert everywhere[400, 500].tolist() == [50, 50, 50]


def green_pixels(frame):
    b, g, r = frame[..., 0].astype(int), frame[..., 1].astype(int), frame[..., 2].astype(int)
    return int(((g > 150) & (r < 80) & (b < 80)).sum())


def test_hud_fps_noise_and_progress_bar():
    frame = draw_hud(gray(), 14.2, overlay.noise_text("relative", 0.05, 0), 0.2, "calibrating 13/64")
    diff = changed(frame, gray())
    assert diff[380:, :300].mean() > 0.2 and not diff[:300, :].any()  # bottom left only
    fuller = draw_hud(gray(), 14.2, "noise off", 0.8, "calibrating 51/64")
    assert green_pixels(fuller) > 2.5 * green_pixels(frame) > 0
    no_bar = draw_hud(gray(), 14.2, "noise off")
    assert green_pixels(no_bar) == 0


def test_overlay_is_fast():
    mask = np.random.default_rng(0).integers(0, 21, (224, 224))
    times = []
    for _ in range(15):
        frame = gray()
        start = time.perf_counter()
        draw_segmentation(frame, mask)
        draw_classification(frame, [("a", 0.5), ("b", 0.3), ("c", 0.1)])
        draw_detections(frame, [[10, 10, 100, 100], [200, 200, 400, 300]], [0.9, 0.4], [0, 5])
        draw_hud(frame, 30.0, "noise relative eta=0.05 seed 0", 0.5, "calibrating 32/64")
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.02  # ~1-3 ms here; generous for a loaded CI machine


def test_fps_counter_averages_last_10_frames():
    fps = FpsCounter()
    assert fps.tick(0.0) == 0.0
    t = 0.0
    for _ in range(5):  # slow start: 1 frame per second...
        t += 1.0
        fps.tick(t)
    for _ in range(10):  # ...then 20 fps: only the last 10 intervals count
        t += 0.05
        rate = fps.tick(t)
    assert rate == pytest.approx(20.0) and fps.fps == pytest.approx(20.0)
    clock = iter([0.0, 0.5]).__next__
    assert FpsCounter(clock=clock).tick() == 0.0


# --- preview server -----------------------------------------------------------------------------

@pytest.fixture
def server():
    srv = PreviewServer(port=0)
    yield srv
    srv.close()


def get(srv, path, timeout=5):
    return urllib.request.urlopen(srv.url.rstrip("/") + path, timeout=timeout)


def read_mjpeg_parts(response, n):
    """The first ``n`` JPEG parts of a multipart MJPEG response, decoded."""
    frames = []
    while len(frames) < n:
        line = response.readline()
        assert line, "stream ended early"
        if not line.startswith(b"--"):
            continue
        headers = {}
        while (line := response.readline().strip()):
            key, value = line.decode().split(":", 1)
            headers[key.lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        data = response.read(int(headers["content-length"]))
        frames.append(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    return frames


def test_status_frame_and_404(server):
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
    with pytest.raises(urllib.error.HTTPError) as err:
        get(server, "/frame.jpg")
    assert err.value.code == 503  # no frame yet
    server.update_status({"fps": np.float32(12.5), "frames": np.int64(7), "noise": "noise off",
                          "calibration_progress": 0.25, "probs": np.arange(3)})
    status = json.load(get(server, "/status"))
    assert status == {"fps": 12.5, "frames": 7, "noise": "noise off", "calibration_progress": 0.25,
                      "probs": [0, 1, 2], "published": 0}
    server.publish(gray(240, 320, 200))
    with get(server, "/frame.jpg") as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        image = cv2.imdecode(np.frombuffer(response.read(), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (240, 320, 3) and abs(int(image.mean()) - 200) <= 2
    assert json.load(get(server, "/status"))["published"] == 1
    with pytest.raises(urllib.error.HTTPError) as err:
        get(server, "/nope")
    assert err.value.code == 404


def test_page_has_stream_and_status_elements(server):
    page = get(server, "/").read().decode()
    for needle in ('src="/stream.mjpg"', 'id="fps"', 'id="frames"', 'id="status-json"', "/status"):
        assert needle in page


def test_stream_yields_published_frames(server):
    stop = threading.Event()

    def produce():
        level = 0
        while not stop.is_set():
            server.publish(gray(120, 160, level))
            level = (level + 40) % 240
            time.sleep(0.02)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/stream.mjpg")
        response = conn.getresponse()
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("multipart/x-mixed-replace; boundary=")
        frames = read_mjpeg_parts(response, 3)
        conn.close()
    finally:
        stop.set()
        producer.join()
    assert all(f.shape == (120, 160, 3) for f in frames)
    assert len({int(f.mean()) for f in frames}) >= 2  # new frames, not the same one again


def test_slow_client_does_not_block_producer_and_close_ends_streams(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")  # ...and never read
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # big JPEGs
    start = time.perf_counter()
    for _ in range(60):
        server.publish(frame)
    assert time.perf_counter() - start < 5
    server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)
    sock.close()


def test_history_keeps_the_whole_stream_in_bounded_memory():
    """/history: chart points thinned evenly as the stream goes on (never more than HISTORY_POINTS), the
    newest HISTORY_SAMPLES agreement samples, and the frame the model became calibrated."""
    import json
    import urllib.request

    from edge_cbn.stream.preview import HISTORY_POINTS, HISTORY_SAMPLES, PreviewServer

    with PreviewServer(port=0) as server:
        for n in range(1, 5001):
            server.update_status({"frames": n, "fps": 30.0, "latency_ms": 9.5, "refolds": n // 100,
                                  "calibrated_at_frame": 104 if n >= 104 else None,
                                  "agreement": {"frame": n, "before": 40.0, "after": 80.0} if n % 2 == 0 else None})
        with urllib.request.urlopen(f"{server.url}history", timeout=2) as response:
            history = json.loads(response.read())
    frames = [p[0] for p in history["points"]]
    assert HISTORY_POINTS // 2 <= len(frames) < HISTORY_POINTS and frames == sorted(frames)
    gaps = {b - a for a, b in zip(frames, frames[1:])}
    assert len(gaps) == 1  # evenly thinned
    assert frames[-1] > 4500 and frames[0] < 500  # the whole stream, start to end
    assert len(history["samples"]) == HISTORY_SAMPLES and history["samples"][-1] == [5000, 40.0, 80.0]
    assert history["calibrated_at_frame"] == 104
