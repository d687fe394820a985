"""Image files read within a pixel bound, so that a small file cannot take gigabytes (a 6 MB JPEG of
20000 x 20000 pixels decodes to 1.2 GB).  Device side: numpy and OpenCV.

The size is read from the file's header before anything is decoded (PNG, JPEG, BMP, GIF; OpenCV's own
`OPENCV_IO_MAX_IMAGE_PIXELS`, which `import edge_cbn` sets to the same bound unless OpenCV is loaded
already, bounds the other formats).  Within `max_pixels()` the image is decoded as it
is; a larger JPEG is decoded at 1/2, 1/4 or 1/8 of its size (OpenCV's reduced DCT decoding: the memory of
the reduced image only), the least reduction that fits, since the models take a few hundred pixels a side;
anything else over the bound is `BadInput` naming the size and the bound.  `--max-image-pixels` raises the
bound (the environment variable EDGE_CBN_MAX_IMAGE_PIXELS, which worker processes inherit).

A truncated JPEG or PNG (a cut download: OpenCV decodes what is there and fills the rest grey, with no
error) is `BadInput` too: a JPEG must hold its end-of-image marker after its scan data, a PNG end with
its IEND chunk.  `check_image` runs every check of a file without decoding it (datasets, before a sweep)."""
from __future__ import annotations

import os
import struct

import cv2
import numpy as np

from .. import MAX_IMAGE_PIXELS as MAX_PIXELS  # an 8000 x 6000 photo decodes to 144 MB of BGR
from .errors import BadInput
from .validation import regular_file

ENV = "EDGE_CBN_MAX_IMAGE_PIXELS"

_REDUCED = ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk a complete PNG ends with
_TAIL_BYTES = 1 << 16  # where a JPEG's end-of-image marker is looked for first
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # JPEG frame headers


def max_pixels() -> int:
    """The bound: EDGE_CBN_MAX_IMAGE_PIXELS when set (--max-image-pixels), else MAX_PIXELS."""
    try:
        return max(1, int(os.environ.get(ENV) or MAX_PIXELS))
    except ValueError:
        return MAX_PIXELS


def header_size(path) -> tuple[str, int, int] | None:
    """(format, width, height) from the file's first bytes for PNG, JPEG, BMP and GIF; None otherwise."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return ("png", *struct.unpack(">II", head[16:24]))
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return ("gif", *struct.unpack("<HH", head[6:10]))
        if head[:2] == b"BM" and len(head) >= 26:
            width, height = struct.unpack("<ii", head[18:26])
            return ("bmp", abs(width), abs(height))
        if head[:2] == b"\xff\xd8":
            f.seek(2)
            return _jpeg_size(f)
    return None


def _jpeg_segments(f):
    """(marker, payload bytes) of each segment of a JPEG stream positioned after its SOI marker, with `f`
    at the payload's start when yielded; ends at the end-of-image marker, or at anything that is no segment
    (a bounded walk: a hostile file cannot make it loop)."""
    for _ in range(10_000):
        marker = f.read(2)
        while len(marker) == 2 and marker[0] == 0xFF and marker[1] == 0xFF:  # fill bytes
            marker = marker[1:] + f.read(1)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] == 0xD9:
            return
        if marker[1] in (0xD8, 0x01) or 0xD0 <= marker[1] <= 0xD7:
            continue  # markers without a length
        length = f.read(2)
        if len(length) < 2:
            return
        start, size = f.tell(), struct.unpack(">H", length)[0] - 2
        yield marker[1], size
        f.seek(start + size)


def _jpeg_size(f) -> tuple[str, int, int] | None:
    """The size in the first frame header (SOFn) of a JPEG stream positioned after its SOI marker."""
    for marker, _ in _jpeg_segments(f):
        if marker in _SOF:
            frame = f.read(5)
            return ("jpeg", *struct.unpack(">HH", frame[1:5])[::-1]) if len(frame) == 5 else None
    return None


def _sos_offset(f) -> int | None:
    """The offset just after the first start-of-scan segment of a JPEG positioned after its SOI marker
    (APPn segments, an EXIF thumbnail with its own markers among them, are skipped by their length)."""
    for marker, size in _jpeg_segments(f):
        if marker == 0xDA:
            return f.tell() + size
    return None


def truncated(path, kind: str) -> bool:
    """Whether the JPEG or PNG at `path` is cut short: a JPEG without an end-of-image marker after its
    first scan (the tail is searched first, the rest of the scan data only when the tail lacks it), a PNG
    that does not end with IEND.  Other formats: False."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if kind == "png":
            f.seek(max(0, end - len(_PNG_END)))
            return f.read() != _PNG_END
        if kind != "jpeg":
            return False
        f.seek(2)
        scan = _sos_offset(f)
        if scan is None:
            return True
        f.seek(max(scan, end - _TAIL_BYTES))
        if b"\xff\xd9" in f.read():
            return False
        f.seek(scan)  # a JPEG with more than the tail's worth of data after its end marker: search it all
        carry = b""
        for block in iter(lambda: f.read(1 << 20), b""):
            if b"\xff\xd9" in carry + block:
                return False
            carry = block[-1:]
        return True


def _decode_flag(path) -> int:
    """The `cv2.imread` flag that decodes `path` within the bound; `BadInput` when nothing does, or the
    file is a truncated JPEG or PNG."""
    bound, flag = max_pixels(), cv2.IMREAD_COLOR
    if os.path.getsize(path) == 0:
        raise BadInput(path, "an empty file, not an image")
    size = header_size(path)
    if size is not None and truncated(path, size[0]):
        raise BadInput(path, f"a truncated {size[0].upper()} (cut short: no end marker after its data)")
    if size is not None and size[1] * size[2] > bound:
        kind, width, height = size
        fits = [f for k, f in _REDUCED if -(-width // k) * -(-height // k) <= bound] if kind == "jpeg" else []
        if not fits:
            raise BadInput(path, f"{width}x{height} pixels ({width * height / 1e6:.0f} MP) is over the bound of "
                                 f"{bound / 1e6:g} MP (--max-image-pixels)")
        flag = fits[0]
    return flag


def check_image(path) -> None:
    """Every check `read_image` makes before it decodes, without decoding: a regular file, not truncated,
    within the pixel bound (or a JPEG that reduces into it).

    Raises:
        BadInput: naming the file and what is wrong with it.
    """
    _decode_flag(regular_file(path))


def read_image(path) -> np.ndarray | None:
    """The image at `path` as BGR uint8, decoded within `max_pixels()` (see the module); None when OpenCV
    cannot decode it.  `BadInput` when it is not a regular file, is truncated, or is over the bound and not
    a JPEG."""
    path = regular_file(path)
    flag = _decode_flag(path)
    try:
        return cv2.imread(str(path), flag)
    except cv2.error:  # OpenCV raises for a header over its own limit (the formats read here say so first)
        return None
