"""The labelled metrics and readers against answers worked out by hand: top-k, a confusion matrix's mIoU and
pixel accuracy, pycocotools' AP on a known set of boxes, the ImageNet wnid order, the reports."""
import csv
import json
import sys

import numpy as np
import pytest

from edge_cbn.lab.evaluate import datasets, metrics, report
from edge_cbn.lab.evaluate.datasets import Sample
from edge_cbn.runtime.errors import BadInput
from labelled_tiny import WNIDS, coco_dataset, imagenet_folder, images, voc_dataset


def test_wnids_are_the_1000_in_class_index_order():
    wnids = datasets.imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141" and wnids == sorted(wnids)
    assert all(wnids[i] == w for i, w in WNIDS.items())


def test_topk_perfect_and_known():
    score = metrics.TopK()
    for truth in range(4):  # a perfect prediction: the true class first
        score.add(Sample("x", truth), [(truth, "", 0.9), ((truth + 1) % 4, "", 0.1)])
    assert score.result() == {"top1": 100.0, "top5": 100.0}
    score = metrics.TopK()
    score.add(Sample("x", 3), [(0, "", .5), (1, "", .2), (2, "", .1), (3, "", .1), (4, "", .1)])  # 4th
    score.add(Sample("x", 9), [(0, "", .5), (1, "", .2), (2, "", .1), (3, "", .1), (4, "", .1)])  # absent
    score.add(Sample("x", 0), [(0, "", .5)])  # first
    score.add(Sample("x", 5), [(0, "", .5), (1, "", .2), (2, "", .1), (3, "", .1), (4, "", .05), (5, "", .05)])  # 6th
    assert score.result() == {"top1": 25.0, "top5": 50.0}


def test_confusion_matrix_gives_the_hand_computed_miou():
    truth = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 2]])
    conf = metrics.confusion_matrix(pred, truth, 3)
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 2, 0], [0, 0, 1]])  # the 255 pixel left out
    # IoU: class 0 1/(2+1-1), class 1 2/(2+3-2), class 2 1/(1+1-1); pixel accuracy 4 of 5
    out = metrics.miou_pixacc(conf)
    assert out["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)
    assert out["pixacc"] == pytest.approx(80.0)
    # a perfect prediction scores 100, and a class absent from truth and prediction has no IoU
    assert metrics.miou_pixacc(metrics.confusion_matrix(truth, truth, 5)) == {"miou": 100.0, "pixacc": 100.0}
    with pytest.raises(ValueError, match="true class 7"):
        metrics.confusion_matrix(pred, np.array([[7, 0, 0], [0, 0, 0]]), 3)


def test_segmentation_sums_one_matrix_over_images(tmp_path):
    """Two images: the matrix is summed (not per-image scores averaged), from VOC palette PNGs."""
    a = np.array([[0, 0, 1], [1, 255, 2]], np.uint8)
    b = np.zeros((2, 3), np.uint8)
    root = voc_dataset(tmp_path / "voc", {"a": a, "b": b}, ["t0"], np.random.default_rng(0))
    ds = datasets.voc_segmentation(root, "val")
    np.testing.assert_array_equal(datasets.read_mask(ds.samples[0].truth), a)
    score = metrics.Segmentation(3)
    score.add(ds.samples[0], np.array([[0, 1, 1], [1, 2, 2]]))
    score.add(ds.samples[1], np.zeros((2, 3), np.uint8))
    # [[1+6, 1, 0], [0, 2, 0], [0, 0, 1]]: IoU 7/8, 2/3, 1; pixel accuracy 10/11
    assert score.result()["miou"] == pytest.approx(100 * (7 / 8 + 2 / 3 + 1) / 3)
    assert score.result()["pixacc"] == pytest.approx(100 * 10 / 11)


def coco_two_images(tmp_path):
    ann, img_dir = coco_dataset(tmp_path, [[(3, [10, 10, 30, 30])], [(3, [50, 50, 20, 20]), (5, [0, 0, 8, 8])]],
                                [(3, "cat"), (5, "dog")], np.random.default_rng(0), size=(100, 100))
    return datasets.coco_detection(ann, img_dir)


def test_pycocotools_ap_of_a_known_set_of_boxes(tmp_path):
    ds = coco_two_images(tmp_path)
    cats = metrics.category_ids(["Cat", "dog", "bird"], ds.coco)
    assert cats == [3, 5, None]
    perfect = metrics.CocoDetection(ds.coco, cats)
    perfect.add(ds.samples[0], [(0, "cat", 0.9, (10, 10, 40, 40))])
    perfect.add(ds.samples[1], [(0, "cat", 0.8, (50, 50, 70, 70)), (1, "dog", 0.7, (0, 0, 8, 8)),
                                (2, "bird", 0.9, (0, 0, 50, 50))])  # a class the annotations lack: not scored
    assert perfect.result() == {"map50": pytest.approx(100.0), "mar50": pytest.approx(100.0)}
    # cat, by score: TP 0.9, FP 0.8, TP 0.7 -> precision 1 up to recall 0.5, 2/3 up to recall 1: COCO's
    # 101-point AP (51 + 50 * 2/3) / 101; dog: missed, AP 0 and recall 0.  Mean over the two categories.
    known = metrics.CocoDetection(ds.coco, cats)
    known.add(ds.samples[0], [(0, "cat", 0.9, (10, 10, 40, 40)), (0, "cat", 0.8, (60, 0, 70, 10))])
    known.add(ds.samples[1], [(0, "cat", 0.7, (50, 50, 70, 70))])
    out = known.result()
    assert out["map50"] == pytest.approx(100 * ((51 + 50 * 2 / 3) / 101 + 0) / 2)
    assert out["mar50"] == pytest.approx(100 * (1 + 0) / 2)
    assert metrics.CocoDetection(ds.coco, cats).result() == {"map50": 0.0, "mar50": 0.0}  # nothing detected


def test_category_ids_stated_or_refused(tmp_path):
    ds = coco_two_images(tmp_path)
    assert metrics.category_ids(["a", "b"], ds.coco, [5, 3]) == [5, 3]
    with pytest.raises(ValueError, match="not in the annotation"):
        metrics.category_ids(["a", "b"], ds.coco, [5, 4])
    with pytest.raises(ValueError, match="--category-ids"):
        metrics.category_ids(["a", "b"], ds.coco)


def test_imagenet_subset_folder_keeps_the_true_class_index(tmp_path):
    rng = np.random.default_rng(0)
    truth = imagenet_folder(tmp_path / "val", [3, 7], 2, rng)  # ImageFolder would number these 0 and 1
    ds = datasets.class_folder(tmp_path / "val")
    assert {s.path: s.truth for s in ds.samples} == truth and sorted({s.truth for s in ds.samples}) == [3, 7]
    (tmp_path / "val" / "cats").mkdir()
    with pytest.raises(BadInput, match="cats"):
        datasets.class_folder(tmp_path / "val")


def test_labels_csv_by_index_or_wnid(tmp_path):
    paths = images(tmp_path / "imgs", 3, np.random.default_rng(0))
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["file", "class"], [paths[0].name, "5"], [paths[1].name, WNIDS[7]],
                                 [paths[2].name, "0"]])
    ds = datasets.class_csv(tmp_path / "imgs", table)
    assert [s.truth for s in ds.samples] == [5, 7, 0]
    table.write_text(f"{paths[0].name},5\n{paths[1].name},tabby\n")
    with pytest.raises(BadInput, match="row 2"):
        datasets.class_csv(tmp_path / "imgs", table)


def test_calibration_must_not_overlap_evaluation(tmp_path):
    rng = np.random.default_rng(0)
    imagenet_folder(tmp_path / "val", [0, 1], 2, rng)
    ds = datasets.class_folder(tmp_path / "val")
    cal = images(tmp_path / "cal", 3, rng)
    datasets.check_disjoint(cal, ds)
    with pytest.raises(BadInput, match="evaluation image"):
        datasets.check_disjoint(cal + [ds.samples[0].path], ds)
    copy = tmp_path / "cal" / ds.samples[1].path.name  # a copy elsewhere is the same image
    copy.write_bytes(ds.samples[1].path.read_bytes())
    with pytest.raises(BadInput, match="evaluation image"):
        datasets.check_disjoint(datasets.image_files(tmp_path / "cal"), ds)
    listed = tmp_path / "cal" / "split.txt"
    listed.write_text("img000.png\nimg001.png\n")
    assert datasets.calibration_images(calib_list=listed) == cal[:2]


def test_subset_and_calibration_frames_are_seeded():
    items = list(range(100))
    a, b = datasets.subset(items, 10), datasets.subset(items, 10)
    assert a == b == sorted(a) and len(set(a)) == 10 and a != items[:10]
    frames = datasets.calibration_frames(["a", "b", "c"], 7)
    assert len(frames) == 7 and set(frames) == {"a", "b", "c"} and frames[:3] == frames[3:6]


RECORDS = [{"preset": "paper", "eta": eta, "seed": seed, "method": m, "metrics": {"top1": v + seed, "top5": v}}
           for eta, base in ((0.0, 70), (0.1, 10)) for seed in (0, 2)
           for m, v in (("original", base), ("calibrated", 68))]


def test_report_table_csv_and_png(tmp_path):
    rows = report.aggregate(RECORDS, ("top1", "top5"), ["original", "calibrated"])
    assert [(r["eta"], r["method"]) for r in rows] == [(0.0, "original"), (0.0, "calibrated"),
                                                        (0.1, "original"), (0.1, "calibrated")]
    assert rows[2]["top1_mean"] == 11.0 and rows[2]["top1_std"] == pytest.approx(np.sqrt(2))
    table = report.markdown_table(rows, ("top1", "top5"), {"original": "Original model"})
    lines = table.splitlines()
    assert lines[0] == "Cells: the mean ± std over 2 chip(s)."  # records without resamples: no interval
    assert lines[2] == "| noise | method | η0 = 0 top-1 | η0 = 0 top-5 | η0 = 0.1 top-1 | η0 = 0.1 top-5 |"
    assert lines[4] == "| paper | Original model | 71.00 ± 1.41 | 70.00 ± 0.00 | 11.00 ± 1.41 | 10.00 ± 0.00 |"
    report.write_csv(rows, ("top1", "top5"), tmp_path / "t.csv")
    back = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert back[2]["method"] == "original" and float(back[2]["top1_mean"]) == 11.0 and back[2]["seeds"] == "0 2"
    pytest.importorskip("matplotlib")
    png = report.plot(rows, ("top1", "top5"), {}, "title", tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recovered_share_of_the_loss():
    rows = report.aggregate(RECORDS, ("top1", "top5"), ["original", "calibrated"])
    [r] = report.recovery(rows, "top1")  # clean 71, original 11, calibrated 69 (means over seeds 0 and 2)
    assert (r["eta"], r["method"], r["loss"]) == (0.1, "calibrated", 60.0)
    assert r["recovered_pct"] == pytest.approx(100 * 58 / 60)
    table = report.recovery_table([r], {"calibrated": "streaming"})
    assert "| paper | loss (points) | 60.0 |" in table and "| paper | streaming | 97 % |" in table
    tiny = [{**x, "metrics": {"top1": 70.5 if x["method"] == "original" and x["eta"] else 71}} for x in RECORDS]
    [r] = report.recovery(report.aggregate(tiny, ("top1",), ["original", "calibrated"]), "top1")
    assert r["recovered_pct"] is None  # half a point lost: no share is stated
    no_clean = [x for x in RECORDS if x["eta"] > 0]
    assert report.recovery(report.aggregate(no_clean, ("top1",), ["original", "calibrated"]), "top1") == []
    assert report.recovery_table([], {}) == ""


def test_report_without_matplotlib_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rows = report.aggregate(RECORDS, ("top1", "top5"), ["original", "calibrated"])
    assert report.plot(rows, ("top1", "top5"), {}, "t", tmp_path / "t.png") is None
    assert capsys.readouterr().err.count("matplotlib") == 1 and not (tmp_path / "t.png").exists()


def test_coco_reader_refuses_missing_images(tmp_path):
    ann, img_dir = coco_dataset(tmp_path, [[(1, [0, 0, 4, 4])]], [(1, "a")], np.random.default_rng(0))
    data = json.loads(ann.read_text())
    data["images"].append({"id": 9, "file_name": "gone.png", "height": 4, "width": 4})
    ann.write_text(json.dumps(data))
    with pytest.raises(BadInput, match="gone.png"):
        datasets.coco_detection(ann, img_dir)
