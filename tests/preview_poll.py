"""Poll a stream's web preview while it runs (shared by the preview tests)."""
import json
import socket
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def polled(port: int, run, paths=("status",)):
    """(what `run()` returned, [(endpoint JSON per path), ...] for every poll that saw frames served)."""
    seen, done = [], threading.Event()

    def poll():
        while not done.is_set():
            try:
                got = []
                for path in paths:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=2) as resp:
                        got.append(json.loads(resp.read()))
                if got[0].get("frames"):
                    seen.append(tuple(got))
            except OSError:
                pass
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = run()
    finally:
        done.set()
        poller.join()
    return result, seen
