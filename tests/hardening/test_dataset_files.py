"""Broken VOC and classification datasets (`lab/evaluate/datasets.py`): each is one line naming the file,
when the dataset is read and before a sweep starts, instead of an internal error or a silent score."""
import os
import struct
import zlib

import numpy as np
import pytest

from edge_cbn.lab.evaluate import datasets
from edge_cbn.runtime.errors import BadInput

pytestmark = pytest.mark.hardening
voc_dataset = pytest.importorskip("labelled_tiny").voc_dataset
imagenet_folder = pytest.importorskip("labelled_tiny").imagenet_folder


@pytest.fixture
def voc(tmp_path):
    rng = np.random.default_rng(0)
    masks = {f"2007_{i:06d}": rng.integers(0, 3, (20, 26)) for i in range(3)}
    return voc_dataset(tmp_path / "VOC2012", masks, ["2008_000001"], rng)


def refused(fn, *args) -> str:
    with pytest.raises(BadInput) as error:
        fn(*args)
    message = str(error.value)
    assert "\n" not in message
    return message


def png_declaring(width, height) -> bytes:
    """A palette PNG header declaring width x height, with a tiny compressed body and IEND."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", bytes(768)) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b""))


def test_a_binary_split_file(voc):
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_bytes(b"\xff\xfe\x00\x81" * 50)
    assert "not a text file" in refused(datasets.voc_segmentation, voc, "val")


@pytest.mark.parametrize("damage", ["truncated", "empty", "bomb"])
def test_a_broken_mask_is_found_before_the_sweep(voc, damage):
    mask = sorted((voc / "SegmentationClass").glob("*.png"))[1]
    data = mask.read_bytes()
    mask.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "bomb": png_declaring(60000, 60000)}[damage])
    message = refused(datasets.voc_segmentation, voc, "val")
    assert str(mask) in message
    assert {"truncated": "truncated PNG", "empty": "", "bomb": "over the bound"}[damage] in message


def test_an_empty_mask_read_during_a_sweep_is_one_line(tmp_path):
    empty = tmp_path / "m.png"
    empty.write_bytes(b"")
    assert str(empty) in refused(datasets.read_mask, empty)


def test_a_truncated_jpeg_is_not_scored(voc):
    image = sorted((voc / "JPEGImages").glob("2007_*.jpg"))[0]
    image.write_bytes(image.read_bytes()[:-200])
    assert "truncated JPEG" in refused(datasets.voc_segmentation, voc, "val")
    assert "truncated JPEG" in refused(datasets.read_bgr, image)


def test_a_binary_labels_csv(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"a.jpg,\x00\xff\xfe\x81\n" * 10)
    assert "not a text file" in refused(datasets.class_csv, root, labels)


def test_a_dangling_link_in_a_class_folder(tmp_path):
    root = tmp_path / "val"
    truth = imagenet_folder(root, [0, 1], 2, np.random.default_rng(0))
    link = next(iter(truth)).parent / "gone.JPEG"
    os.symlink(tmp_path / "nowhere.png", link)
    message = refused(datasets.class_folder, root)
    assert str(link) in message and "link to nothing" in message


def test_a_good_dataset_passes(voc):
    assert len(datasets.voc_segmentation(voc, "val").samples) == 3
