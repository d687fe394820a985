"""The synthetic shape scenes, their COCO / VOC datasets, and the shipped `yolo_shapes` / `fcn_shapes` models:
seeded scenes, valid annotation files, shipped weights that load, BN after every conv, and exported models
that find the pasted shapes on LiteRT."""
import json

import numpy as np
import pytest
from PIL import Image

from edge_cbn.convert import models
from edge_cbn.convert.build import build_model, export_model
from edge_cbn.convert.keras_fold import fold_plan
from edge_cbn.convert.models.shape_classes import SEGMENTATION_CLASSES, SHAPE_CLASSES
from edge_cbn.convert.models.shapes import HEAD
from edge_cbn.convert.weights.checks import MismatchedWeightFile
from edge_cbn.convert.weights.npz import load_npz, read_npz, save_npz, shipped_weights
from edge_cbn.lab.evaluate.metrics import confusion_matrix
from edge_cbn.lab.scenes.synthetic_datasets import write_datasets
from edge_cbn.lab.scenes.synthetic_scenes import scene
from edge_cbn.runtime.bundle import load_bundle
from edge_cbn.runtime.detection import box_iou
from edge_cbn.runtime.errors import BadInput
from edge_cbn.runtime.noisy_model import NoisyModel
from edge_cbn.runtime.processing import Processor

NAMES = ("yolo_shapes", "fcn_shapes")
PREDICTION_CONVS = {"yolo_shapes": ["head16", "head8"], "fcn_shapes": ["classifier"]}
MAX_WEIGHTS_BYTES = 5 * 1024 * 1024
EVAL_SCENES = 24


def test_scenes_are_seeded():
    a, b = scene(0, "val", 3), scene(0, "val", 3)
    assert np.array_equal(a.image, b.image) and a.class_ids == b.class_ids
    assert all(np.array_equal(m, n) for m, n in zip(a.masks, b.masks))
    assert not np.array_equal(a.image, scene(1, "val", 3).image)
    assert not np.array_equal(a.image, scene(0, "train", 3).image)


def test_scene_labels_are_the_visible_shapes():
    s = scene(0, "val", 7)
    assert len(s.class_ids) >= 2
    owners = np.stack(s.masks).sum(0)
    assert owners.max() == 1  # visible masks never overlap
    labels = s.label_map(void_border=False)
    for class_id, mask, (x, y, w, h) in zip(s.class_ids, s.masks, s.boxes()):
        assert (labels[mask] == class_id + 1).all()
        ys, xs = np.nonzero(mask)
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp("shapes"), seed=0, val=6, train=3)


def test_coco_annotations(dataset):
    doc = json.loads((dataset / "coco" / "annotations" / "instances_val.json").read_text())
    assert [(c["id"], c["name"]) for c in doc["categories"]] == list(enumerate(SHAPE_CLASSES, 1))
    images = {im["id"]: im for im in doc["images"]}
    assert len(images) == 6 and all((dataset / "coco" / "val" / im["file_name"]).is_file() for im in images.values())
    assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"]) > 6
    for ann in doc["annotations"]:
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(SHAPE_CLASSES)
        assert 0 < ann["area"] <= w * h and ann["segmentation"] and all(len(p) >= 6 for p in ann["segmentation"])
    coco = pytest.importorskip("pycocotools.coco").COCO(str(dataset / "coco" / "annotations" / "instances_val.json"))
    assert len(coco.getAnnIds()) == len(doc["annotations"])


def test_voc_layout(dataset):
    voc = dataset / "VOC2012"
    for split, count in (("val", 6), ("train", 3)):
        names = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert len(names) == count
        for name in names:
            assert (voc / "JPEGImages" / f"{name}.jpg").is_file()
            png = Image.open(voc / "SegmentationClass" / f"{name}.png")
            assert png.mode == "P"
            values = set(np.unique(np.asarray(png)).tolist())
            assert values <= set(range(len(SEGMENTATION_CLASSES))) | {255} and 255 in values
    doc = json.loads((dataset / "coco" / "annotations" / "instances_val.json").read_text())
    labels = np.asarray(Image.open(voc / "SegmentationClass" / "val_00000.png"))
    for ann in (a for a in doc["annotations"] if a["image_id"] == 1):  # the same scenes in both layouts
        x, y, w, h = (int(v) for v in ann["bbox"])
        assert (labels[y:y + h, x:x + w] == ann["category_id"]).sum() > 0.5 * ann["area"]


@pytest.mark.parametrize("name", NAMES)
def test_registry_entries(name):
    spec = models.get_spec(name)
    assert spec.weights_format == "npz" and spec.input_size == 160
    if spec.task == "detection":
        assert spec.labels == SHAPE_CLASSES and spec.head == HEAD
    else:
        assert spec.labels == SEGMENTATION_CLASSES and spec.head is None


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_load(name):
    path = shipped_weights(models.get_spec(name))
    assert path is not None and 0 < __import__("os").path.getsize(path) <= MAX_WEIGHTS_BYTES
    spec, model = build_model(name)
    assert 0.3e6 < model.count_params() < 1.25e6
    stored = read_npz(path)
    bn = model.get_layer("stem.bn")
    np.testing.assert_array_equal(bn.moving_variance.numpy(), stored["stem.bn.running_var"])


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_follows_every_conv(name):
    model = models.build(name)
    plan = fold_plan(model)  # raises if any BN does not directly follow a conv
    assert [layer.name for layer, _, bn in plan if bn is None] == PREDICTION_CONVS[name]
    assert len([1 for _, _, bn in plan if bn is not None]) >= 20


def test_npz_round_trip_and_refusals(tmp_path):
    model = models.build("yolo_shapes")
    path = save_npz(model, tmp_path / "w.bin")
    other = models.build("yolo_shapes")
    load_npz(other, path)
    np.testing.assert_array_equal(other.get_layer("head8").get_weights()[0], model.get_layer("head8").get_weights()[0])
    with pytest.raises(MismatchedWeightFile):
        load_npz(models.build("fcn_shapes"), path)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(BadInput):
        read_npz(tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def val_scenes():
    return [scene(0, "val", i) for i in range(EVAL_SCENES)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles")
    return {name: load_bundle(export_model(*build_model(name), out / f"{name}.tflite")) for name in NAMES}


def _predict(bundle, image_rgb, **kw):
    proc = Processor(bundle, **kw)
    x, ctx = proc.preprocess(np.ascontiguousarray(image_rgb[..., ::-1]))
    return proc.postprocess(NoisyModel(bundle).run(x, 0), ctx)


def test_exported_detector_finds_the_shapes(exported, val_scenes):
    bundle = exported["yolo_shapes"]
    assert bundle.meta["head"] == HEAD and bundle.meta["labels"] == list(SHAPE_CLASSES)
    found = total = false = 0
    for s in val_scenes:
        dets = _predict(bundle, s.image, conf_threshold=0.25)
        boxes = s.boxes()
        boxes[:, 2:] += boxes[:, :2]
        matched = set()
        for class_id, _, _, box in dets:
            ious = box_iou(np.float32(box), boxes) * (np.asarray(s.class_ids) == class_id)
            hit = int(np.argmax(ious)) if len(boxes) else -1
            if hit >= 0 and ious[hit] >= 0.5 and hit not in matched:
                matched.add(hit)
            else:
                false += 1
        found, total = found + len(matched), total + len(boxes)
    # The shipped model: recall 0.63, 30 % false detections here (mAP@0.5 76 on 500 scenes); random weights: 0.
    assert found / total >= 0.5, (found, total)
    assert false / max(1, found + false) <= 0.4, (false, found)


def test_exported_segmenter_labels_the_shapes(exported, val_scenes):
    bundle = exported["fcn_shapes"]
    assert bundle.meta["labels"] == list(SEGMENTATION_CLASSES)
    n = len(SEGMENTATION_CLASSES)
    confusion = np.zeros((n, n), np.int64)
    for s in val_scenes:
        confusion += confusion_matrix(_predict(bundle, s.image), s.label_map(), n)  # 255 band ignored
    tp = np.diag(confusion)
    iou = tp / (confusion.sum(0) + confusion.sum(1) - tp)
    assert iou[0] >= 0.9 and iou[1:].min() >= 0.4 and iou.mean() >= 0.6, np.round(iou, 2)
