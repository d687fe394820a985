"""Tiny test media, made by the tests: numbered video frames, MJPEG AVIs and the ways to damage them, and
image headers that lie about their size."""
import struct
import zlib

import cv2
import numpy as np

W, H = 64, 48


def numbered_frame(i):
    """A flat gray frame whose level encodes ``i`` (mod 32) robustly through JPEG/MPEG-4."""
    return np.full((H, W, 3), 8 * (i % 32) + 4, np.uint8)


def number_of(frame):
    """The ``i`` (mod 32) of a :func:`numbered_frame`."""
    return int(round((float(frame.mean()) - 4) / 8))


def write_video(path, n, fourcc="MJPG"):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (W, H))
    assert writer.isOpened()
    for i in range(n):
        writer.write(numbered_frame(i))
    writer.release()
    return path


def jpeg_starts(data):
    """Offsets of the JPEG start markers in an MJPEG AVI: one per frame."""
    return [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]


def corrupt_mjpeg_frames(path, frames, seed=0):
    """Overwrite the JPEG data of each of ``frames`` (its AVI chunk's payload, whose size is the 4 bytes
    before it) with random bytes; the chunk headers stay intact, as after a damaged stretch of a disk."""
    data = bytearray(path.read_bytes())
    starts = jpeg_starts(data)
    rng = np.random.default_rng(seed)
    for k in frames:
        begin = starts[k]
        end = begin + struct.unpack_from("<I", data, begin - 4)[0]
        data[begin:end] = rng.integers(0, 256, end - begin, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def forge_avi_frame_count(path, count):
    """Make an AVI's headers (avih total frames, strh length) declare ``count`` frames."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.find(b"avih") + 8 + 16, count)
    struct.pack_into("<I", data, data.find(b"strh") + 8 + 32, count)
    path.write_bytes(bytes(data))
    return path


def png_header(width, height):
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def jpeg_header(width, height):
    """An 8x8 JPEG whose frame header (SOF0) claims ``width`` x ``height`` pixels."""
    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    struct.pack_into(">HH", data, data.find(b"\xff\xc0") + 5, height, width)
    return bytes(data)


class FakeCapture:
    """Stands in for cv2.VideoCapture (shared by the camera and network source tests). Each open takes the
    next plan of the script: None fails to open, a number n delivers n frames (valued by the open's serial
    number) and then fails every read. `opened_with` keeps the arguments it was opened with."""

    plans, opened, instances = [], 0, []

    @classmethod
    def script(cls, *plans):
        cls.plans, cls.opened, cls.instances = list(plans), 0, []

    def __init__(self, index, *args):
        FakeCapture.opened += 1
        self.serial, self.opened_with = FakeCapture.opened, (index, *args)
        self.left = FakeCapture.plans.pop(0) if FakeCapture.plans else 10 ** 9
        self.released = False
        FakeCapture.instances.append(self)

    def isOpened(self):
        return self.left is not None

    def set(self, prop, value):
        return True

    def get(self, prop):
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        if not self.left:
            return False, None
        self.left -= 1
        return True, np.full((4, 4, 3), self.serial, np.uint8)

    def release(self):
        self.released = True
