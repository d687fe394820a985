#!/usr/bin/env python3
"""A screenshot of the preview page of the README's main command once the model is calibrated:
`python tools/preview_screenshot.py docs/figures/preview.png` (the figure in README and RESULTS).

It starts `edge-cbn stream --serve` on the bundled clip under `relative` noise, waits until the stream is
past FRAME (default 1000: calibrated, and the live Fig. 1 averaging 20 sampled frames), and takes the
page in headless Chromium (Debian's chromium and chromium-driver, `pip install selenium`)."""
import json
import socket
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_frame(url: str, frame: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/history", timeout=2) as resp:
                history = json.loads(resp.read())
            if history["points"] and history["points"][-1][0] >= frame and history.get("layer_shift"):
                return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"the stream did not reach frame {frame} within {timeout_s:.0f} s")


def main(out: str, frame: int = 1000) -> None:
    port = free_port()
    stream = subprocess.Popen([sys.executable, "-m", "edge_cbn.cli", "stream", "--noise", "relative", "--eta", "0.05",
                               "--frames", "3000", "--headless", "--serve", str(port)], stdout=subprocess.DEVNULL)
    try:
        wait_for_frame(f"http://127.0.0.1:{port}", frame)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1800"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            time.sleep(3)  # a few polls of /status and /history
            driver.save_screenshot(out)
        finally:
            driver.quit()
    finally:
        stream.terminate()
        stream.wait(timeout=30)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "preview.png", int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
