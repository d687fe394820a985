"""The intervals over evaluation images and chips (`lab/evaluate/bootstrap.py`): each scorer's metrics on a
resample equal the metrics of the images drawn, detection's equal pycocotools run on a set with the drawn
images duplicated, and the intervals have the width binomial sampling gives; tools/goal_table.py sets runs
side by side."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_cbn.lab.evaluate import bootstrap, datasets, metrics, report
from edge_cbn.lab.evaluate.datasets import Sample
from labelled_tiny import coco_dataset, voc_dataset

pytest.importorskip("pycocotools")


def test_resamples_are_draws_with_replacement_and_the_same_every_time():
    w = bootstrap.resample_weights(50, 200)
    assert w.shape == (200, 50) and (w.sum(1) == 50).all() and (w >= 0).all()
    np.testing.assert_array_equal(w, bootstrap.resample_weights(50, 200))
    assert 0.3 < (w == 0).mean() < 0.43  # an image is left out of a resample with probability (1 - 1/n)^n


def test_topk_on_a_resample_counts_each_image_as_often_as_drawn():
    score = metrics.TopK()
    for truth, first in ((0, 0), (1, 0), (2, 2), (3, 1)):  # hits: 1, 0, 1, 0
        score.add(Sample("x", truth), [(first, "", 1.0)])
    out = score.resampled(np.array([[1, 1, 1, 1], [4, 0, 0, 0], [0, 2, 0, 2], [1, 0, 3, 0]], float))
    np.testing.assert_allclose(out["top1"], [50.0, 100.0, 0.0, 100.0])


def test_an_interval_has_the_width_binomial_sampling_gives():
    """400 images each right with probability 0.7: the 95 % interval of top-1 is about ±1.96 sqrt(p q / n)."""
    score = metrics.TopK()
    rng = np.random.default_rng(3)
    for right in rng.random(400) < 0.7:
        score.add(Sample("x", 0), [(0 if right else 1, "", 1.0)])
    lo, hi = bootstrap.interval(bootstrap.cell_replicates([metrics.bootstrap_replicates(score)["top1"]]))
    half = 100 * 1.96 * np.sqrt(0.7 * 0.3 / 400)
    assert lo < score.result()["top1"] < hi
    assert hi - lo == pytest.approx(2 * half, rel=0.15)


def test_chips_widen_the_interval_and_a_single_value_has_none():
    images = np.random.default_rng(0).normal(50, 1, (3, 1000))
    alone = bootstrap.interval(bootstrap.cell_replicates(images))
    apart = bootstrap.interval(bootstrap.cell_replicates(images + np.array([[-5.0], [0.0], [5.0]])))
    assert apart[1] - apart[0] > 3 * (alone[1] - alone[0])
    assert bootstrap.interval([np.nan, np.nan]) == (None, None)


def test_segmentation_on_a_resample_sums_the_drawn_images_matrices(tmp_path):
    rng = np.random.default_rng(0)
    masks = {f"m{i}": rng.integers(0, 3, (4, 5)).astype(np.uint8) for i in range(3)}
    ds = datasets.voc_segmentation(voc_dataset(tmp_path / "voc", masks, ["t"], rng), "val")
    score = metrics.Segmentation(3)
    preds = [rng.integers(0, 3, (4, 5)) for _ in ds.samples]
    for sample, pred in zip(ds.samples, preds):
        score.add(sample, pred)
    drawn = [2, 2, 0]  # image 2 twice, image 0 once
    again = metrics.Segmentation(3)
    for i in drawn:
        again.add(ds.samples[i], preds[i])
    out = score.resampled(np.bincount(drawn, minlength=3)[None].astype(float))
    assert out["miou"][0] == pytest.approx(again.result()["miou"])
    assert out["pixacc"][0] == pytest.approx(again.result()["pixacc"])
    whole = score.resampled(np.ones((1, 3)))
    assert whole["miou"][0] == pytest.approx(score.result()["miou"])


def detections_for(rng, boxes):
    """A noisy detector's output for an image's boxes: most found with jitter, some false ones."""
    found = []
    for cat, (x, y, w, h) in boxes:
        if rng.random() < 0.8:
            j = rng.normal(0, 3, 4)
            found.append((0 if cat == 3 else 1, "", float(rng.random()), (x + j[0], y + j[1], x + w + j[2], y + h + j[3])))
    for _ in range(rng.integers(0, 3)):
        x, y = rng.integers(0, 70, 2)
        found.append((int(rng.integers(0, 2)), "", float(rng.random()), (x, y, x + 20, y + 20)))
    return found


def random_boxes(rng, n):
    return [[(int(rng.choice([3, 5])), [int(v) for v in rng.integers(0, 60, 2)] + [int(v) for v in rng.integers(8, 30, 2)])
             for _ in range(rng.integers(0, 4))] for _ in range(n)]


def test_detection_on_a_resample_is_pycocotools_on_the_drawn_images(tmp_path):
    """The weighted AP of a resample equals COCOeval run on a set where each drawn image is a new image."""
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 30)
    ann, img_dir = coco_dataset(tmp_path / "all", boxes, [(3, "cat"), (5, "dog")], rng, size=(100, 100))
    ds = datasets.coco_detection(ann, img_dir)
    found = [detections_for(rng, b) for b in boxes]
    score = metrics.CocoDetection(ds.coco, metrics.category_ids(["cat", "dog"], ds.coco))
    for sample, f in zip(ds.samples, found):
        score.add(sample, f)
    whole = score.resampled(np.ones((1, len(boxes))))
    assert {k: v[0] for k, v in whole.items()} == pytest.approx(score.result(), abs=1e-9)
    drawn = np.sort(rng.integers(0, len(boxes), len(boxes)))
    ann2, img2 = coco_dataset(tmp_path / "drawn", [boxes[i] for i in drawn], [(3, "cat"), (5, "dog")], rng,
                              size=(100, 100))
    ds2 = datasets.coco_detection(ann2, img2)
    direct = metrics.CocoDetection(ds2.coco, metrics.category_ids(["cat", "dog"], ds2.coco))
    for sample, i in zip(ds2.samples, drawn):
        direct.add(sample, found[i])
    out = score.resampled(np.bincount(drawn, minlength=len(boxes))[None].astype(float))
    assert {k: v[0] for k, v in out.items()} == pytest.approx(direct.result(), abs=1e-9)


def records(values_by_method, seeds=(0, 1, 2)):
    """Sweep records at eta 0 and 0.3 whose resamples are `values_by_method[method]` + seed + a spread that
    is the same for methods of the same value."""
    out = []
    for (eta, method), base in values_by_method.items():
        noise = np.random.default_rng(int(base)).normal(0, 1, 200)
        for seed in seeds:
            reps = base + seed + noise
            out.append({"preset": "paper", "eta": eta, "seed": seed, "method": method,
                        "metrics": {"top1": base + seed + 0.0, "top5": 100.0}, "resampled": {"top1": list(reps),
                                                                                       "top5": [100.0] * 200}})
    return out


def test_report_cells_shares_and_differences_carry_intervals():
    recs = records({(0.0, "original"): 80.0, (0.3, "original"): 40.0, (0.3, "calibrated"): 76.0,
                    (0.3, "offline_ema"): 76.0, (0.3, "offline_cumulative"): 70.0})
    rows = report.aggregate(recs, ("top1", "top5"), ["original", "calibrated", "offline_ema", "offline_cumulative"])
    table = report.markdown_table(rows, ("top1", "top5"), {})
    assert "percentile bootstrap" in table.splitlines()[0]
    cal = next(r for r in rows if r["method"] == "calibrated")
    assert cal["top1_lo"] < cal["top1_mean"] == 77.0 < cal["top1_hi"]
    assert f"77.00 [{cal['top1_lo']:.2f}, {cal['top1_hi']:.2f}]" in table
    share = next(r for r in report.recovery(rows, "top1") if r["method"] == "calibrated")
    assert share["recovered_pct"] == pytest.approx(90.0)
    assert share["recovered_lo"] < 90.0 < share["recovered_hi"]
    assert "90 % [" in report.recovery_table(report.recovery(rows, "top1"), {})
    diffs = {(d["a"], d["b"]): d for d in report.differences(rows, "top1")}
    # the same images and chips in every method: equal replicates differ by exactly 0, 6 points is one
    assert diffs["calibrated", "offline_ema"]["difference"] == 0 and not diffs["calibrated", "offline_ema"]["significant"]
    assert diffs["calibrated", "offline_cumulative"]["significant"]
    d = diffs["calibrated", "offline_cumulative"]
    assert 0 < d["lo"] < d["difference"] == 6.0 < d["hi"]
    assert "| no |" in report.differences_table(list(diffs.values()), {})


def evaluate_json(path, mode, calibrated, seeds=(0, 1, 2)):
    """An `edge-cbn evaluate detection` JSON of a run in `mode`: original 80 clean, 40 at 0.4."""
    recs = records({(0.0, "original"): 80.0, (0.4, "original"): 40.0, (0.4, "calibrated"): calibrated}, seeds)
    for r in recs:
        r["metrics"] = {"map50": r["metrics"]["top1"], "mar50": 90.0}
        r["resampled"] = {"map50": r["resampled"]["top1"], "mar50": [90.0] * 200}
    path.write_text(json.dumps({"evaluate": "detection", "model": "m", "dataset": "d", "images": 200,
                                "seeds": list(seeds), "cal_frames": 192, "mode": mode, "records": recs}))
    return str(path)


def test_goal_table_puts_runs_side_by_side_with_paired_differences(tmp_path):
    tool = Path(__file__).resolve().parent.parent / "tools" / "goal_table.py"
    files = [evaluate_json(tmp_path / "a.json", "shift", 76.0), evaluate_json(tmp_path / "b.json", "absolute", 70.0)]
    out = subprocess.run([sys.executable, str(tool), "--eta", "0.4", *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header, row = next(x for x in lines if x.startswith("| task")), next(x for x in lines if x.startswith("| detection"))
    assert "| streaming `shift`, batch 1, 192 frames | recovered | streaming `absolute`" in header
    assert "0.4 (0.16)" in row
    assert "| 90 % [" in row and "| 75 % [" in row  # (77 - 41) / 40 and (71 - 41) / 40
    assert "streaming `shift`, batch 1, 192 frames − streaming `absolute`, batch 1, 192 frames: +6.00 points" in out.stdout
    assert "], a difference" in out.stdout
    other = evaluate_json(tmp_path / "c.json", "absolute", 70.0, seeds=(0, 1))
    out = subprocess.run([sys.executable, str(tool), "--eta", "0.4", files[0], other], capture_output=True, text=True)
    assert out.returncode != 0 and "do not pair" in out.stderr


def test_goal_table_reads_the_agreement_proxys_json(tmp_path):
    """`edge-cbn evaluate --json-out` of the agreement proxy: all / confident cells with the intervals it
    printed, the streaming column named by its mode and last checkpoint."""
    tool = Path(__file__).resolve().parent.parent / "tools" / "goal_table.py"
    mean = {"preset": "paper", "eta": 0.2, "seeds": [0, 1, 2]}
    for key, (value, lo, hi) in {"uncalibrated": (36.8, 31, 44), "uncalibrated_confident": (65.6, 50, 80),
                                 "calibrated@96": (80.0, 75, 85), "calibrated@96_confident": (90.0, 80, 99),
                                 "calibrated@192": (88.4, 84, 92), "calibrated@192_confident": (100.0, 100, 100),
                                 "calibrated@192_recovered": (81.6, 74, 88),
                                 "calibrated@192_confident_recovered": (100.0, 100, 100)}.items():
        mean.update({key: value, key + "_lo": lo, key + "_hi": hi})
    path = tmp_path / "lite0.json"
    path.write_text(json.dumps({"evaluate": "agreement", "model": "efficientnet_lite0", "mode": "shift",
                                "means": [mean]}))
    out = subprocess.run([sys.executable, str(tool), "--eta", "0.2", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    row = next(x for x in out.stdout.splitlines() if x.startswith("| classification"))
    assert "| 36.8 [31, 44] / 65.6 [50, 80] | 88.4 [84, 92] / 100.0 [100, 100] | 82 % [74, 88] / 100 % [100, 100] |" in row
    assert "streaming `shift`, batch 1, 192 frames" in out.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = subprocess.run([sys.executable, str(tool), "--eta", "0.2", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "not an `edge-cbn evaluate` JSON" in out.stderr
