"""The preview page in a real headless Chromium: the MJPEG stream shows and keeps moving, the status
updates. Needs Debian's ``chromium`` and ``chromium-driver`` and ``pip install selenium``."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import cv2
import numpy as np
import pytest

from edge_cbn.stream.overlay import draw_hud
from preview_poll import free_port
from edge_cbn.stream.preview import PreviewServer

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: chromium chromium-driver)"),
]

# Sum of the pixels of the <img> drawn onto a canvas: changes when a new frame is shown.
SNAPSHOT_JS = """
const img = document.getElementById('stream');
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const ctx = canvas.getContext('2d');
ctx.drawImage(img, 0, 0);
const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
let sum = 0;
for (let i = 0; i < data.length; i += 4) sum += data[i] + data[i + 1] + data[i + 2];
return sum;
"""


# Pixels of a canvas that are not transparent: what the chart code drew.
CANVAS_INK_JS = """
const canvas = document.getElementById(arguments[0]);
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let ink = 0;
for (let i = 3; i < data.length; i += 4) if (data[i] > 0) ink++;
return ink;
"""


@pytest.fixture
def live_server():
    """A preview server with a producer thread publishing changing frames and statuses."""
    server = PreviewServer(port=0)
    stop = threading.Event()

    def produce():
        n = 0
        while not stop.is_set():
            n += 1
            frame = np.full((240, 320, 3), (n * 37) % 200, np.uint8)
            cv2.putText(frame, f"frame {n}", (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 255, 255), 2)
            draw_hud(frame, 12.5, "noise relative eta=0.05 seed 0", (n % 64) / 64, f"calibrating {n % 64}/64")
            server.publish(frame)
            server.update_status({"model": "demo", "task": "classification", "fps": 12.5, "frames": n,
                                  "noise": "noise relative eta=0.05 seed 0",
                                  "calibration": f"calibrating {n % 64}/64",
                                  "calibration_progress": (n % 64) / 64, "calibrated_at_frame": 208,
                                  "calibrated_at_seconds": 2.9, "latency_ms": 8.0 + n % 5, "refolds": n // 5,
                                  "agreement": {"frame": n, "before": 40.0, "after": 80.0} if n % 3 == 0 else None,
                                  "layer_shift": {"layers": [f"bn{i}" for i in range(12)], "samples": n,
                                                  "uncalibrated": [0.01 * (i + 1) for i in range(12)],
                                                  "calibrated": [0.001 * (i + 1) for i in range(12)]}})
            time.sleep(0.05)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    yield server
    stop.set()
    producer.join()
    server.close()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must not download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(15)
    yield driver
    driver.quit()


def test_page_shows_live_stream_and_status(live_server, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 10, poll_frequency=0.1)
    browser.get(live_server.url)
    text = lambda element_id: browser.find_element("id", element_id).text  # noqa: E731

    wait.until(lambda d: d.execute_script("return document.getElementById('stream').naturalWidth") > 0)
    assert browser.execute_script("return document.getElementById('stream').naturalHeight") == 240
    first = browser.execute_script(SNAPSHOT_JS)
    wait.until(lambda d: d.execute_script(SNAPSHOT_JS) != first)  # frames keep arriving

    wait.until(lambda d: text("frames").isdigit())
    frames = int(text("frames"))
    wait.until(lambda d: text("frames").isdigit() and int(text("frames")) > frames)  # status keeps updating
    assert text("fps") == "12.5"
    assert text("connection") == "live"
    assert text("noise") == "noise relative eta=0.05 seed 0"
    assert text("calibration").startswith("calibrating ")
    assert text("calibrated-at") == "frame 208 (2.9 s)"
    assert '"model": "demo"' in text("status-json")

    # The charts draw /history: points and samples arrive, and each canvas holds drawn pixels.
    charts = lambda key: browser.execute_script(f"return Number(document.getElementById('charts').dataset.{key} || 0)")  # noqa: E731
    wait.until(lambda d: charts("points") > 5 and charts("samples") > 2 and charts("layers") == 12)
    for canvas in ("agreement-chart", "speed-chart", "shift-chart"):
        drawn = browser.execute_script(CANVAS_INK_JS, canvas)
        assert drawn > 100, (canvas, drawn)
    browser.save_screenshot(str(tmp_path / "preview.png"))


def test_the_main_command_s_preview_shows_the_agreement_rising(browser, tmp_path):
    """The README's main command with --serve, on the bundled clip and the real default model: the page,
    never reloaded, shows the agreement samples arrive, the served model agreeing with the clean one far
    more often than the uncalibrated one once calibrated, and the live Fig. 1 drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    env = dict(os.environ, EDGE_CBN_CACHE=str(tmp_path))
    port = free_port()
    stream = subprocess.Popen([sys.executable, "-m", "edge_cbn.cli", "stream", "--noise", "relative", "--eta", "0.05",
                               "--frames", "3000", "--agreement-every", "5", "--headless", "--serve", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait = WebDriverWait(browser, 300, poll_frequency=1)
        wait.until(lambda d: _up(d, port))
        charts = lambda key: browser.execute_script(f"return Number(document.getElementById('charts').dataset.{key} || 0)")  # noqa: E731
        wait.until(lambda d: charts("samples") >= 60 and charts("layers") > 0)
        history = json.loads(browser.execute_script(
            "return fetch('/history').then(r => r.text())"))
        after_calibration = [s for s in history["samples"] if s[0] > history["calibrated_at_frame"]]
        before = sum(s[1] for s in after_calibration) / len(after_calibration)
        served = sum(s[2] for s in after_calibration) / len(after_calibration)
        assert served >= before + 20, (before, served)
        for canvas in ("agreement-chart", "shift-chart"):
            assert browser.execute_script(CANVAS_INK_JS, canvas) > 100, canvas
    finally:
        stream.terminate()
        stream.wait(timeout=60)


def _up(driver, port) -> bool:
    """Load the page once the server answers (the first run converts the default model first)."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1).close()
    except OSError:
        return False
    if not driver.current_url.startswith(f"http://127.0.0.1:{port}"):
        driver.get(f"http://127.0.0.1:{port}/")
    return True
