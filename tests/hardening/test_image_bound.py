"""A small image file that would decode to gigabytes: the size comes from the header before anything is
decoded; a JPEG over the bound is decoded reduced (1/2, 1/4, 1/8: the memory of the reduced image), any
other format over it is one line naming the size and the bound; --max-image-pixels moves the bound."""
import struct
import zlib

import cv2
import numpy as np
import pytest

from edge_cbn.runtime import images
from edge_cbn.runtime.errors import BadInput

pytestmark = pytest.mark.hardening


def png_header_only(path, width, height):
    """A PNG whose IHDR declares width x height (the data is a stub: the header is what is checked)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["png", "jpeg", "bmp"])
def test_the_header_gives_the_size(tmp_path, kind):
    path = tmp_path / f"a.{kind}"
    cv2.imwrite(str(path), np.zeros((37, 53, 3), np.uint8))
    assert images.header_size(path) == (kind, 53, 37)


def test_a_huge_png_is_refused_before_decoding(tmp_path):
    path = png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(BadInput, match="20000x20000 pixels .400 MP. is over the bound of 50 MP"):
        images.read_image(path)


def test_a_jpeg_over_the_bound_is_decoded_reduced(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), np.full((400, 600, 3), 128, np.uint8))
    monkeypatch.setenv(images.ENV, str(300 * 200))  # 400x600 is 4 times over: 1/2 on each side fits
    assert images.read_image(path).shape == (200, 300, 3)
    monkeypatch.setenv(images.ENV, str(400 * 600))
    assert images.read_image(path).shape == (400, 600, 3)
    monkeypatch.setenv(images.ENV, "100")  # not even 1/8 fits
    with pytest.raises(BadInput, match="over the bound"):
        images.read_image(path)


def test_the_stream_skips_such_a_file_with_its_reason(tmp_path, caplog):
    from edge_cbn.stream.sources import ImageDirSource

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    png_header_only(tmp_path / "b.png", 20000, 20000)
    with ImageDirSource(tmp_path) as source:
        frames = list(source)
    assert len(frames) == 1 and source.skipped == 1 and "over the bound" in caplog.text


def test_the_flag_sets_the_bound_for_workers_too(monkeypatch):
    from click.testing import CliRunner

    from edge_cbn.cli import main

    monkeypatch.setenv(images.ENV, "1")  # recorded: whatever the flag sets is undone after the test
    result = CliRunner().invoke(main, ["stream", "--max-image-pixels", "123", "--help"])
    assert result.exit_code == 0 and images.max_pixels() == 123
