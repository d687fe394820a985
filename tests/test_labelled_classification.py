"""`edge-cbn evaluate classification` end to end on a tiny exported model and a tiny ImageNet-style folder:
known answers through the whole harness, the TFLite path against Keras on clean weights, the cache."""
import json

import numpy as np
import pytest

pytest.importorskip("keras")

from edge_cbn.lab.evaluate import datasets, labelled  # noqa: E402
from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.runtime.noisy_model import NoisyModel  # noqa: E402
from edge_cbn.runtime.processing import Processor  # noqa: E402
from labelled_tiny import cells, exported, imagenet_folder, images, run_cli  # noqa: E402
from tiny import PRE  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    model, path = exported("classification", root)
    imagenet_folder(root / "val", [0, 1, 3], 3, rng)  # class 2 absent: 3 still means index 3
    images(root / "cal", 4, rng)
    return model, path, root


def test_tflite_and_keras_give_the_same_metric_on_clean_weights(tiny):
    model, path, root = tiny
    bundle = load_bundle(path)
    ds = datasets.class_folder(root / "val")
    setup = labelled.Setup(bundle, Processor(bundle), ds, labelled.scorer_factory(bundle, ds), [], center_crop=0.875)
    lite = labelled.score(setup, NoisyModel(bundle, num_threads=1).run)
    keras = labelled.score(setup, labelled.keras_runner(model, PRE))
    assert lite == keras and 0 <= lite["top1"] <= lite["top5"] <= 100


def test_perfect_predictions_score_100_through_the_harness(tiny, tmp_path, monkeypatch):
    _, path, root = tiny
    seen = []

    def oracle(setup, run, sample, frame):  # the model runs (calibration too); its prediction is replaced
        seen.append(frame)
        return [(sample.truth, "", 1.0)]

    monkeypatch.setattr(labelled, "predict", oracle)
    res, out = run_cli("classification", path, tmp_path, "--data", str(root / "val"), "--calib-dir",
                       str(root / "cal"), "--noise", "paper:0,0.1", "--seeds", "0,1")
    assert res.exit_code == 0, res.output
    assert set(cells(out, "top1").values()) == set(cells(out, "top5").values()) == {(100.0, 0.0)}
    assert len(out["rows"]) == 4 and len(out["records"]) == 8 and out["images"] == 9
    # every method meets the same inference indices: the evaluation set's, far from the calibration frames
    assert seen[:9] == list(range(labelled.EVAL_FRAME0, labelled.EVAL_FRAME0 + 9)) and len(seen) == 72


def test_sweep_reports_and_resumes_from_the_cache(tiny, tmp_path, monkeypatch):
    _, path, root = tiny
    args = ("--data", str(root / "val"), "--calib-dir", str(root / "cal"), "--noise", "paper:0,0.3",
            "--seeds", "0,1", "--limit", "6")
    res, out = run_cli("classification", path, tmp_path, *args)
    assert res.exit_code == 0, res.output
    top1 = cells(out, "top1")
    # No noise: the noisy model is the clean one, and shift calibration leaves it as it is.
    assert top1[0.0, "original"] == top1[0.0, "calibrated"]
    assert out["images"] == 6 and out["calibration_images"] == 4 and out["cal_frames"] == 6
    assert "| noise | method | η0 = 0 top-1 | η0 = 0 top-5 | η0 = 0.3 top-1 |" in res.stdout
    for kind in ("markdown", "csv", "png"):
        assert (tmp_path / f"classification-tiny_classification.{'md' if kind == 'markdown' else kind}").is_file()

    cache = tmp_path / "cache.jsonl"
    lines = cache.read_text().splitlines()
    assert len(lines) == 8
    forged = json.loads(lines[6])
    forged["record"]["metrics"] = {k: 99.0 for k in forged["record"]["metrics"]}  # a planted result, its MAC stale
    lines[6] = json.dumps(forged)
    cache.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20] + "\n" + "\n".join(lines[6:]) + "\n")  # line 6 cut
    ran = []
    real = labelled.evaluate_setting
    monkeypatch.setattr(labelled, "evaluate_setting", lambda *a: (ran.append(a[1:4] + (a[5],)), real(*a))[1])
    res2, out2 = run_cli("classification", path, tmp_path, *args)
    assert res2.exit_code == 0, res2.output
    assert ran == [("paper", 0.3, 0, ["calibrated"]), ("paper", 0.3, 1, ["original"])]  # the cut and the forged
    assert out2["rows"] == out["rows"]
    # A rerun says what it read back instead of computing, and which lines failed their check.
    assert out2["from_cache"] == 6 and out2["cache_rejected"] == 2
    assert f"6 of 8 results read back from {cache}" in res2.stderr and "2 line(s)" in res2.stderr
    ran.clear()
    res3, out3 = run_cli("classification", path, tmp_path, *args, "--no-cache")
    assert res3.exit_code == 0 and out3["from_cache"] == 0 and len(ran) == 4 and out3["rows"] == out["rows"]


def test_offline_algorithm_1_beside_the_stream(tiny, tmp_path, monkeypatch):
    model, path, root = tiny
    monkeypatch.setattr("edge_cbn.lab.evaluate.tasks.offline_model", lambda bundle, weights: model)
    res, out = run_cli("classification", path, tmp_path, "--data", str(root / "val"), "--calib-dir",
                       str(root / "cal"), "--noise", "relative:0.2", "--seeds", "3", "--offline", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    assert [r["method"] for r in out["rows"]] == list(labelled.METHODS)
    assert out["offline_batch_size"] == 2 and out["momentum"] == 0.999
    assert all(0 <= r["top1_mean"] <= 100 for r in out["rows"])


def test_refuses_calibration_on_evaluation_images_and_a_wrong_task(tiny, tmp_path):
    _, path, root = tiny
    res, _ = run_cli("classification", path, tmp_path, "--data", str(root / "val"), "--calib-dir", str(root))
    assert res.exit_code == 1 and "evaluation image" in res.output
    res, _ = run_cli("detection", path, tmp_path, "--annotations", str(path), "--images", str(root),
                     "--calib-dir", str(root / "cal"))
    assert res.exit_code == 1 and "not a COCO annotation file" in res.output


def test_folder_plus_labels_csv(tiny, tmp_path, monkeypatch):
    """--labels: the truth from the CSV (an index or a wnid per file), not from folder names."""
    _, path, root = tiny
    files = sorted((root / "val").rglob("*.JPEG"))[:3]
    (tmp_path / "labels.csv").write_text(f"file,class\n{files[0].relative_to(root)},2\n"
                                         f"{files[1].relative_to(root)},n01491361\n{files[2].relative_to(root)},1\n")
    truths = []
    monkeypatch.setattr(labelled, "predict",
                        lambda setup, run, sample, frame: truths.append(sample.truth) or [(2, "", 1.0)])
    res, out = run_cli("classification", path, tmp_path, "--data", str(root), "--labels", str(tmp_path / "labels.csv"),
                       "--calib-dir", str(root / "cal"), "--noise", "none:0", "--seeds", "0", "--center-crop", "1")
    assert res.exit_code == 0, res.output
    assert truths[:3] == [2, 3, 1] and cells(out, "top1")[0.0, "original"] == (100 / 3, 0.0)
