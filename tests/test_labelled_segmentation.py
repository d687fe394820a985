"""`edge-cbn evaluate segmentation` end to end on a tiny FCN-style export and a tiny VOC2012 layout: known
masks give the hand-computed mIoU through the whole harness; TFLite and Keras agree on clean weights."""
import numpy as np
import pytest

pytest.importorskip("keras")
pytest.importorskip("PIL")

from edge_cbn.lab.evaluate import datasets, labelled  # noqa: E402
from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.runtime.noisy_model import NoisyModel  # noqa: E402
from edge_cbn.runtime.processing import Processor  # noqa: E402
from labelled_tiny import SEG_PRE, cells, exported, run_cli, voc_dataset  # noqa: E402

BLOCK = np.ones((4, 5), np.int64)
TRUTH = np.kron([[0, 0, 1], [1, 255, 2]], BLOCK)  # 8 x 15 pixels, 255 = void
PRED = np.kron([[0, 1, 1], [1, 2, 2]], BLOCK)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    model, path = exported("segmentation", root)
    voc = voc_dataset(root / "VOC2012", {"v1": TRUTH, "v2": np.zeros_like(TRUTH)}, ["t1", "t2", "t3"],
                      np.random.default_rng(0))
    return model, path, voc


def test_known_masks_give_the_hand_computed_miou_through_the_harness(tiny, tmp_path, monkeypatch):
    """v1 as in the metric test, v2 all background and predicted so: per block-pixel counts
    [[1+6, 1, 0], [0, 2, 0], [0, 0, 1]] x 20 -> IoU 7/8, 2/3, 1; pixel accuracy 10/11."""
    known = {"v1": PRED.astype(np.uint8), "v2": np.zeros_like(TRUTH, np.uint8)}
    monkeypatch.setattr(labelled, "predict", lambda setup, run, sample, frame: known[sample.path.stem])
    res, out = run_cli("segmentation", tiny[1], tmp_path, "--voc-root", str(tiny[2]), "--noise", "paper:0,0.1",
                       "--seeds", "0,1")
    assert res.exit_code == 0, res.output
    for (eta, method), (mean, std) in cells(out, "miou").items():
        assert mean == pytest.approx(100 * (7 / 8 + 2 / 3 + 1) / 3) and std == 0
    assert {round(m, 9) for m, _ in cells(out, "pixacc").values()} == {round(100 * 10 / 11, 9)}


def test_tflite_and_keras_give_the_same_metric_on_clean_weights(tiny):
    model, path, voc = tiny
    bundle = load_bundle(path)
    ds = datasets.voc_segmentation(voc, "val")
    setup = labelled.Setup(bundle, Processor(bundle), ds, labelled.scorer_factory(bundle, ds), [])
    lite = labelled.score(setup, NoisyModel(bundle, num_threads=1).run)
    assert lite == labelled.score(setup, labelled.keras_runner(model, SEG_PRE))


def test_harness_end_to_end_with_the_tiny_segmenter(tiny, tmp_path):
    """Calibration on the train split by default; the val split refused as calibration data."""
    res, out = run_cli("segmentation", tiny[1], tmp_path, "--voc-root", str(tiny[2]), "--noise", "paper:0,0.3",
                       "--seeds", "0")
    assert res.exit_code == 0, res.output
    m = cells(out, "miou")
    assert m[0.0, "original"] == m[0.0, "calibrated"] and all(0 <= v <= 100 for v, _ in m.values())
    assert out["calibration_images"] == 3
    res, _ = run_cli("segmentation", tiny[1], tmp_path, "--voc-root", str(tiny[2]), "--calib-split", "val")
    assert res.exit_code == 1 and "evaluation image" in res.output
