"""`edge-cbn evaluate detection` end to end on a tiny YOLO-style export and a tiny COCO-format set: a known
set of boxes gives pycocotools' known AP through the whole harness; TFLite and Keras agree on clean weights."""
import numpy as np
import pytest

pytest.importorskip("keras")
pytest.importorskip("pycocotools")

from edge_cbn.lab.evaluate import datasets, labelled  # noqa: E402
from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.runtime.noisy_model import NoisyModel  # noqa: E402
from edge_cbn.runtime.processing import Processor  # noqa: E402
from labelled_tiny import DARKNET, cells, coco_dataset, exported, images, run_cli  # noqa: E402

# Image 1: a cat; image 2: a cat and a dog (COCO ids 3 and 5; the model's classes are "cat", "dog").
BOXES = [[(3, [4, 4, 20, 20])], [(3, [20, 10, 16, 16]), (5, [0, 0, 8, 8])]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    rng = np.random.default_rng(0)
    model, path = exported("detection", root)
    ann, img_dir = coco_dataset(root / "coco", BOXES, [(3, "cat"), (5, "dog")], rng)
    images(root / "cal", 3, rng, size=(36, 44))
    return model, path, root, ann, img_dir


def args(tiny, *more):
    _, _, root, ann, img_dir = tiny
    return ("--annotations", str(ann), "--images", str(img_dir), "--calib-dir", str(root / "cal"), *more)


def test_known_boxes_give_the_known_ap_through_the_harness(tiny, tmp_path, monkeypatch):
    """cat: TP 0.9, FP 0.8, TP 0.7 -> COCO's 101-point AP (51 + 50 * 2/3) / 101, recall 1; dog: missed."""
    known = {1: [(0, "cat", 0.9, (4, 4, 24, 24)), (0, "cat", 0.8, (30, 0, 40, 8))],
             2: [(0, "cat", 0.7, (20, 10, 36, 26))]}
    monkeypatch.setattr(labelled, "predict", lambda setup, run, sample, frame: known[sample.truth])
    res, out = run_cli("detection", tiny[1], tmp_path, *args(tiny, "--noise", "paper:0,0.1", "--seeds", "0,1"))
    assert res.exit_code == 0, res.output
    ap = 100 * ((51 + 50 * 2 / 3) / 101) / 2
    assert {k: (round(m, 9), s) for k, (m, s) in cells(out, "map50").items()} == {
        (eta, method): (round(ap, 9), 0.0) for eta in (0.0, 0.1) for method in ("original", "calibrated")}
    assert set(cells(out, "mar50").values()) == {(50.0, 0.0)}
    assert "η0 = 0.1 mAP@0.5 | η0 = 0.1 mAR@0.5 |" in res.stdout


def test_tflite_and_keras_give_the_same_metric_on_clean_weights(tiny):
    model, path, _, ann, img_dir = tiny
    bundle = load_bundle(path)
    ds = datasets.coco_detection(ann, img_dir)
    setup = labelled.Setup(bundle, Processor(bundle, conf_threshold=0.005), ds, labelled.scorer_factory(bundle, ds), [])
    lite = labelled.score(setup, NoisyModel(bundle, num_threads=1).run)
    keras = labelled.score(setup, labelled.keras_runner(model, DARKNET))
    assert lite == pytest.approx(keras, abs=1e-9) and lite["mar50"] > 0  # random weights still find some


def test_harness_end_to_end_with_the_tiny_detector(tiny, tmp_path):
    res, out = run_cli("detection", tiny[1], tmp_path, *args(tiny, "--noise", "paper:0,0.3", "--seeds", "0"))
    assert res.exit_code == 0, res.output
    m = cells(out, "map50")
    assert m[0.0, "original"] == m[0.0, "calibrated"]  # no noise: shift calibration changes nothing
    assert all(0 <= v <= 100 for v, _ in m.values()) and out["evaluate"] == "detection"
    assert (tmp_path / "detection-tiny_detection.png").is_file()


def test_category_ids_flag(tiny, tmp_path):
    res, _ = run_cli("detection", tiny[1], tmp_path, *args(tiny, "--noise", "none:0", "--seeds", "0",
                                                          "--category-ids", "3,4"))
    assert res.exit_code == 2 and "--category-ids" in res.output and "not in the annotation" in res.output
