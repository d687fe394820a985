"""Out-of-distribution scenes (`make-data --backgrounds procedural`): the same shapes and labels as the photo
scenes, painted on seeded procedural textures.  Seeded, a set of N scenes is a prefix of N + 1, unlike the
photo scenes, free of photo pixels (the photo loader may not even be called), and written by the tool as a
COCO + VOC set the evaluation readers load, marked with the backgrounds it used."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edge_cbn.convert.models.shape_classes import SEGMENTATION_CLASSES, SHAPE_CLASSES
from edge_cbn.lab.evaluate import datasets
from edge_cbn.lab.scenes import synthetic_scenes
from edge_cbn.lab.scenes.synthetic_datasets import write_datasets
from edge_cbn.lab.scenes.procedural import TEXTURES, texture
from edge_cbn.lab.scenes.synthetic_scenes import BACKGROUNDS, scene, scenes

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_synthetic.py"
PROCEDURAL = "procedural"


def same_scene(a, b) -> bool:
    return (np.array_equal(a.image, b.image) and a.class_ids == b.class_ids
            and all(np.array_equal(m, n) for m, n in zip(a.masks, b.masks)))


def test_procedural_scenes_are_seeded():
    a = scene(0, "val", 3, backgrounds=PROCEDURAL)
    assert same_scene(a, scene(0, "val", 3, backgrounds=PROCEDURAL))
    assert not np.array_equal(a.image, scene(1, "val", 3, backgrounds=PROCEDURAL).image)
    assert not np.array_equal(a.image, scene(0, "train", 3, backgrounds=PROCEDURAL).image)
    later = list(scenes(0, "val", 2, start=3, backgrounds=PROCEDURAL))  # any subset regenerates alone
    assert same_scene(later[0], a)


def test_procedural_scenes_differ_from_the_photo_scenes():
    for i in range(4):
        photo, procedural = scene(0, "val", i), scene(0, "val", i, backgrounds=PROCEDURAL)
        assert not np.array_equal(photo.image, procedural.image)
        assert np.abs(photo.image.astype(int) - procedural.image.astype(int)).mean() > 10


def test_no_photo_pixels(monkeypatch):
    """The photo loader raises, and procedural scenes still come, texture fills included."""
    def no_photos(*args, **kwargs):
        raise AssertionError("a procedural scene asked for the photos")

    monkeypatch.setattr(synthetic_scenes, "photo_list", no_photos)
    monkeypatch.setattr(synthetic_scenes, "load_photos", no_photos)
    calls = []
    backdrop = BACKGROUNDS[PROCEDURAL]
    monkeypatch.setitem(BACKGROUNDS, PROCEDURAL, lambda rng, hw: calls.append(hw) or backdrop(rng, hw))
    count = 20
    drawn = list(scenes(0, "val", count, backgrounds=PROCEDURAL))
    assert len(drawn) == count and sum(len(s.class_ids) for s in drawn) > count
    assert len(calls) > count  # the shapes' texture fills came from the procedural textures too
    with pytest.raises(AssertionError, match="photos"):
        scene(0, "val", 0)


@pytest.mark.parametrize("pattern", TEXTURES, ids=lambda t: t.__name__)
def test_every_texture_fills_any_region(pattern):
    """Backgrounds and the shapes' fills (regions down to a pixel wide) alike: finite, not flat."""
    rng = np.random.default_rng(0)
    for hw in ((160, 160), (120, 200), (7, 3), (1, 12)):
        image = pattern(rng, hw)
        assert image.shape == (*hw, 3) and image.dtype == np.float32 and np.isfinite(image).all()
    assert pattern(rng, (160, 160)).std() > 1


def test_textures_have_a_photos_range():
    rng = np.random.default_rng(1)
    images = [texture(rng, (40, 40)) for _ in range(100)]
    assert min(i.min() for i in images) >= 0 and max(i.max() for i in images) <= 255


def test_procedural_labels_are_the_visible_shapes():
    """As in photo mode: visible masks never overlap, the label map is them, boxes enclose them."""
    checked = 0
    for s in scenes(0, "val", 6, backgrounds=PROCEDURAL):
        if s.masks:
            assert np.stack(s.masks).sum(0).max() == 1
        labels = s.label_map(void_border=False)
        assert (labels > 0).sum() == sum(int(m.sum()) for m in s.masks)
        for class_id, mask, (x, y, w, h) in zip(s.class_ids, s.masks, s.boxes()):
            assert (labels[mask] == class_id + 1).all()
            ys, xs = np.nonzero(mask)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            checked += 1
    assert checked >= 6


def test_unknown_backgrounds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="procedural"):
        scene(0, "val", 0, backgrounds="paintings")
    with pytest.raises(ValueError, match="photos"):
        write_datasets(tmp_path / "set", val=1, train=1, backgrounds="paintings")
    assert not (tmp_path / "set").exists()


def test_a_procedural_set_is_a_prefix_of_a_larger_one(tmp_path):
    small = write_datasets(tmp_path / "small", val=3, train=2, backgrounds=PROCEDURAL)
    large = write_datasets(tmp_path / "large", val=4, train=2, backgrounds=PROCEDURAL)
    for name in ("val_00000", "val_00001", "val_00002"):
        for part in (f"coco/val/{name}.jpg", f"VOC2012/SegmentationClass/{name}.png"):
            assert (small / part).read_bytes() == (large / part).read_bytes()
    docs = [json.loads((d / "coco/annotations/instances_val.json").read_text()) for d in (small, large)]
    assert docs[1]["annotations"][:len(docs[0]["annotations"])] == docs[0]["annotations"]


def load_tool():
    spec = importlib.util.spec_from_file_location("train_synthetic", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def tool():
    return load_tool()


def test_make_data_help_names_the_backgrounds(tool):
    shown = CliRunner().invoke(tool.cli, ["make-data", "--help"]).output
    assert "--backgrounds [photos|procedural]" in shown and "out-of-distribution" in shown


def test_make_data_writes_a_procedural_set_the_readers_load(tool, tmp_path):
    out = tmp_path / "ood"
    res = CliRunner().invoke(tool.cli, ["make-data", "--out", str(out), "--count", "5", "--calibration-count", "3",
                                        "--backgrounds", PROCEDURAL], catch_exceptions=False)
    assert res.exit_code == 0 and "procedural backgrounds" in res.output
    manifest = json.loads((out / "scenes.json").read_text())
    assert manifest["backgrounds"] == PROCEDURAL and manifest["splits"] == {"val": 5, "train": 3}
    annotations = out / "coco" / "annotations" / "instances_val.json"
    doc = json.loads(annotations.read_text())
    assert doc["info"]["backgrounds"] == PROCEDURAL and "procedural" in doc["info"]["description"]
    assert [(c["id"], c["name"]) for c in doc["categories"]] == list(enumerate(SHAPE_CLASSES, 1))
    detection = datasets.coco_detection(annotations, out / "coco" / "val")
    assert len(detection.samples) == 5 and all(s.path.is_file() for s in detection.samples)
    segmentation = datasets.voc_segmentation(out / "VOC2012", "val")
    assert len(segmentation.samples) == 5
    for split, count in (("val", 5), ("train", 3)):
        names = (out / "VOC2012" / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert len(names) == count
        png = Image.open(out / "VOC2012" / "SegmentationClass" / f"{names[0]}.png")
        values = set(np.unique(np.asarray(png)).tolist())
        assert png.mode == "P" and values <= set(range(len(SEGMENTATION_CLASSES))) | {255}
    coco = pytest.importorskip("pycocotools.coco").COCO(str(annotations))
    assert len(coco.getAnnIds()) == len(doc["annotations"]) > 0


def test_a_photo_set_keeps_its_files(tmp_path):
    """No manifest and no "backgrounds" key: the photo sets' bytes are what they were before the option."""
    out = write_datasets(tmp_path / "photos", val=2, train=1)
    assert not (out / "scenes.json").exists()
    info = json.loads((out / "coco" / "annotations" / "instances_val.json").read_text())["info"]
    assert info == {"description": "edge-cbn synthetic shapes, split val, seed 0", "version": "1"}
