"""The preview server's limits on loopback, each test bounded and self-stopping: slow-drip clients are
dropped at the header deadline while others are served, 50 clients connecting at once all get a stream,
one past the cap gets a clear 503, a stream client that stops reading is dropped, and no path reaches a
file."""
import contextlib
import select
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from edge_cbn.stream.preview import BUSY, PreviewServer

pytestmark = pytest.mark.hardening


def wait_until(condition, timeout):
    """Poll `condition` until it holds or `timeout` s pass; whether it held."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


class Producer:
    """Publishes frames in a thread while in the `with` block, as the stream loop would."""

    def __init__(self, server, frame):
        self.server, self.frame, self.stop = server, frame, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.server.publish(self.frame)
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def get_status(server, timeout=2):
    with urllib.request.urlopen(f"{server.url}status", timeout=timeout) as response:
        return response.status


def open_stream(port, timeout=3.0, rcvbuf=None):
    """A raw client asking for the MJPEG stream; returns the socket."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small window
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def first_part(sock):
    """Bytes up to the end of the stream's first part header (the 200 line and a frame boundary)."""
    data = b""
    while b"Content-Type: image/jpeg" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the first frame: {data[:80]!r}"
        data += chunk
    return data


def test_slow_drip_clients_are_dropped_at_the_deadline_while_others_are_served():
    """20 clients send one byte of their request line every 0.3 s; each is closed by the server at the
    1 s head deadline (in total: a per-read timeout of 1 s would never fire), and a normal client is
    served meanwhile."""
    deadline, drip = 1.0, 0.3
    with PreviewServer(port=0, head_deadline_s=deadline) as server:
        start = time.monotonic()
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=2) for _ in range(20)]
        request, closed_at, sent, next_drip = b"GET /status HTTP/1.1\r\nHost: x\r\n", {}, 0, start
        served_in = None
        while len(closed_at) < len(socks) and time.monotonic() - start < 4 * deadline:
            dripping = [s for s in socks if s not in closed_at]
            if time.monotonic() >= next_drip:
                for sock in dripping:
                    try:
                        sock.send(request[sent:sent + 1])
                    except OSError:
                        closed_at[sock] = time.monotonic() - start
                sent, next_drip = sent + 1, next_drip + drip
            if served_in is None:
                t0 = time.monotonic()
                assert get_status(server) == 200
                served_in = time.monotonic() - t0
            wait = max(0.0, next_drip - time.monotonic())
            for sock in select.select([s for s in socks if s not in closed_at], [], [], wait)[0]:
                try:
                    gone = sock.recv(64) == b""
                except OSError:
                    gone = True
                if gone:
                    closed_at[sock] = time.monotonic() - start
        assert len(closed_at) == 20 and sent >= 4  # each had sent a byte at most 0.3 s before
        assert deadline <= min(closed_at.values()) and max(closed_at.values()) < deadline + 0.5
        assert served_in < 0.5
        assert wait_until(lambda: server.clients == 0, 1.0)
        for sock in socks:
            sock.close()


def test_fifty_clients_connecting_at_once_all_get_the_stream():
    """The old listen backlog of 5 made 25 of 50 simultaneous MJPEG connects fail."""
    barrier, results = threading.Barrier(50), [None] * 50

    def client(i, port):
        try:
            barrier.wait(timeout=5)
            sock = open_stream(port, timeout=3.0)
            head = first_part(sock)
            results[i] = head.split(b"\r\n", 1)[0]
            sock.close()
        except Exception as exc:  # noqa: BLE001 - recorded, asserted below
            results[i] = repr(exc)

    frame = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    with PreviewServer(port=0) as server, Producer(server, frame):
        threads = [threading.Thread(target=client, args=(i, server.port)) for i in range(50)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        elapsed = time.monotonic() - start
        assert results == [b"HTTP/1.0 200 OK"] * 50, [r for r in results if r != b"HTTP/1.0 200 OK"][:3]
        assert server.refused == 0 and elapsed < 3.0
        assert wait_until(lambda: server.clients == 0, 2.0)  # each stream thread left with its client


def test_one_past_the_cap_gets_a_clear_503_and_the_slot_comes_back():
    frame = np.zeros((48, 64, 3), np.uint8)
    with PreviewServer(port=0, max_clients=4) as server, Producer(server, frame):
        streams = [open_stream(server.port) for _ in range(4)]
        for sock in streams:
            first_part(sock)
        assert server.clients == 4
        with pytest.raises(urllib.error.HTTPError) as error:
            get_status(server)
        assert error.value.code == 503 and error.value.headers["Retry-After"] == "5"
        assert error.value.read() == b"too many preview clients, retry\r\n"
        assert server.refused == 1 and server.clients == 4
        for sock in streams:
            sock.close()
        assert wait_until(lambda: server.clients == 0, 2.0)  # the next frame's write finds them gone
        assert get_status(server) == 200
    assert BUSY.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")


def test_stream_client_that_stops_reading_is_dropped_at_the_send_timeout():
    big = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # ~300 KB JPEGs
    with PreviewServer(port=0, send_timeout_s=0.5) as server, Producer(server, big):
        sock = open_stream(server.port, rcvbuf=4096)  # ...and never read again
        assert wait_until(lambda: server.clients == 1, 1.0)
        start = time.monotonic()
        assert wait_until(lambda: server.clients == 0, 5.0), "the stalled client still holds its thread"
        dropped_after = time.monotonic() - start
        published = server.published
        assert wait_until(lambda: server.published > published + 5, 1.0)  # the producer never waited
        sock.close()
    assert dropped_after < 3.0


def test_no_path_reaches_a_file():
    paths = ["/../../../../etc/passwd", "/static/../sources.py", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd",
             "/index.html/../../preview.py", "/stream.mjpg/../../x", "/static/index.html"]
    with PreviewServer(port=0) as server:
        for path in paths:
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=2)
            assert error.value.code == 404 and error.value.read() == b"not found\n", path


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
    (b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n", b"431"),
])
def test_a_request_too_long_gets_414_or_431_and_the_stream_goes_on(request_bytes, status):
    """A 70 KB URL or a 100 KB header was a closed connection with no answer; now the status that says
    why, and the next request is served."""
    with PreviewServer(port=0) as server, Producer(server, np.zeros((48, 64, 3), np.uint8)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(request_bytes)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.split(b"\r\n", 1)[0].split()[1] == status, answer[:200]
        assert get_status(server) == 200


def test_a_new_viewer_takes_the_slot_of_a_connection_still_sending_its_request():
    """Slowloris: every slot held by connections that send nothing.  Before, a viewer polling /status was
    served 17 times in 60; now the oldest idle connection gives up its slot, every time."""
    with PreviewServer(port=0, max_clients=4) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=2) for _ in range(4)]
        assert wait_until(lambda: server.clients == 4, 1.0)
        served = 0
        for _ in range(10):
            time.sleep(0.6)  # past the grace of a request that has not arrived
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))  # the attack goes on
            served += get_status(server) == 200
        assert served == 10 and server.refused == 0 and server.evicted >= 10
        for sock in idle:
            sock.close()


def test_a_new_viewer_takes_the_slot_of_a_stream_client_that_stalled():
    """Slow MJPEG readers in every slot: before, a viewer was served 0 times in 60."""
    big = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # ~300 KB JPEGs
    with PreviewServer(port=0, max_clients=3, stall_s=0.5) as server, Producer(server, big):
        stalled = [open_stream(server.port, rcvbuf=4096) for _ in range(3)]  # ...and never read again
        assert wait_until(lambda: server.clients == 3, 1.0)
        time.sleep(1.0)
        assert get_status(server) == 200 and server.refused == 0 and server.evicted == 1
        for sock in stalled:
            sock.close()


def test_clients_that_are_being_served_keep_their_slots():
    """Fairness never ends a healthy viewer: streams that read every frame keep their slots, and the new
    connection gets the 503."""
    frame = np.zeros((48, 64, 3), np.uint8)
    with PreviewServer(port=0, max_clients=2, stall_s=0.5) as server, Producer(server, frame):
        readers = [open_stream(server.port) for _ in range(2)]
        stop = threading.Event()

        def read(sock):
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    sock.recv(65536)

        threads = [threading.Thread(target=read, args=(sock,), daemon=True) for sock in readers]
        for t in threads:
            t.start()
        time.sleep(1.5)
        with pytest.raises(urllib.error.HTTPError) as error:
            get_status(server)
        assert error.value.code == 503 and server.evicted == 0
        stop.set()
        for sock in readers:
            sock.close()
        for t in threads:
            t.join(timeout=2)
