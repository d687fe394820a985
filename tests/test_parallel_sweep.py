"""`edge-cbn evaluate TASK --workers N | --ray ADDRESS`: the sharded sweep gives exactly the records of one
process (counts, summed confusion matrices, concatenated detections evaluated once), with 1 and 2 local
workers and on a real two-node Ray cluster; a worker killed mid-shard is retried to the same result; the
shard cache resumes an interrupted sweep."""
import functools
import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")
pytest.importorskip("pycocotools")

from edge_cbn.cluster.local import LocalPool  # noqa: E402
from edge_cbn.cluster.shard_cache import ShardCache  # noqa: E402
from edge_cbn.lab.evaluate import labelled, parallel_sweep  # noqa: E402
from edge_cbn.lab.evaluate.tasks import make_setup  # noqa: E402
from edge_cbn.lab.evaluate.sweep_worker import run_unit  # noqa: E402
from labelled_tiny import coco_dataset, exported, imagenet_folder, images, run_cli, voc_dataset  # noqa: E402
from sweep_faults import kill_when_ready, killed_once  # noqa: E402

NOISE = ("--noise", "paper:0,0.5", "--seeds", "0,1", "--shard-size", "2")
BOXES = [[(3, [4, 4, 20, 20])], [(3, [20, 10, 16, 16]), (5, [0, 0, 8, 8])], [(5, [10, 10, 20, 20])]] * 2


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """{task: (model path, dataset flags, Keras model)}: tiny models and datasets of 5-9 images, odd shard
    splits."""
    root = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(0)
    out = {}
    model, path = exported("classification", root)
    imagenet_folder(root / "val", [0, 1, 3], 3, rng)
    images(root / "cal", 4, rng)
    out["classification"] = (path, ("--data", str(root / "val"), "--calib-dir", str(root / "cal")), model)
    model, path = exported("detection", root)
    ann, img_dir = coco_dataset(root / "coco", BOXES, [(3, "cat"), (5, "dog")], rng)
    images(root / "dcal", 3, rng, size=(36, 44))
    out["detection"] = (path, ("--annotations", str(ann), "--images", str(img_dir), "--calib-dir", str(root / "dcal")),
                        model)
    model, path = exported("segmentation", root)
    voc = voc_dataset(root / "VOC2012", {f"v{i}": rng.integers(0, 3, (8, 15)) for i in range(5)}, ["t1", "t2"], rng)
    out["segmentation"] = (path, ("--voc-root", str(voc)), model)
    return out


def metrics_of(task, tasks, out, *extra):
    path, flags, _ = tasks[task]
    res, line = run_cli(task, path, out, *flags, *NOISE, *extra)
    assert res.exit_code == 0, res.output
    # the metrics on the bootstrap's resamples, from the cache: the merged per-image results agree too
    cached = [json.loads(x)["record"] for x in (Path(out) / "cache.jsonl").read_text().splitlines()]
    resampled = {(r["preset"], r["eta"], r["seed"], r["method"]): r["resampled"] for r in cached}
    return [(r["preset"], r["eta"], r["seed"], r["method"], r["metrics"],
             resampled[r["preset"], r["eta"], r["seed"], r["method"]]) for r in line["records"]]


@pytest.fixture(scope="module")
def one_process(tasks, tmp_path_factory):
    return {task: metrics_of(task, tasks, tmp_path_factory.mktemp(task)) for task in tasks}


def test_the_fixture_set_is_not_trivial(one_process):
    """Noise changes the detector's and the segmenter's metrics, and calibration changes them again, so
    equality below is not that of constant numbers."""
    for task in ("detection", "segmentation"):
        by = {(eta, seed, method): m for _, eta, seed, method, m, _ in one_process[task]}
        assert by[0.5, 0, "original"] != by[0.0, 0, "original"]
        assert by[0.5, 0, "original"] != by[0.5, 0, "calibrated"]


@pytest.mark.parametrize("workers, task", [("1", "detection"), ("2", "classification"), ("2", "detection"),
                                           ("2", "segmentation")])
def test_local_workers_give_exactly_the_one_process_records(task, workers, tasks, one_process, tmp_path):
    assert metrics_of(task, tasks, tmp_path, "--workers", workers) == one_process[task]


def test_a_ray_cluster_gives_exactly_the_one_process_records(ray_cluster, tasks, one_process, tmp_path):
    for task in tasks:
        assert metrics_of(task, tasks, tmp_path / task, "--ray", ray_cluster) == one_process[task], task


def test_offline_methods_on_ray_equal_one_process(ray_cluster, tasks, tmp_path, monkeypatch):
    """--offline: Algorithm 1 runs in a worker from the model's architecture JSON and weight arrays (here the
    tiny unregistered model), with the same statistics as in this process."""
    model = tasks["classification"][2]
    monkeypatch.setattr("edge_cbn.lab.evaluate.tasks.offline_model", lambda bundle, weights: model)
    offline = ("--offline", "--batch-size", "2")
    here = metrics_of("classification", tasks, tmp_path / "one", *offline)
    assert {method for *_, method, _, _ in here} == set(labelled.METHODS)
    assert metrics_of("classification", tasks, tmp_path / "ray", *offline, "--ray", ray_cluster) == here


def sharded(tasks, pool, out, unit=run_unit):
    """The detection sweep through the Python API (as `--workers` runs it, with `unit` in the workers):
    (records as `metrics_of` gives them, the sweep)."""
    from edge_cbn.lab.evaluate import datasets
    from edge_cbn.runtime.bundle import load_bundle
    from edge_cbn.runtime.stream_calibrator import DEFAULTS

    path, flags, _ = tasks["detection"]
    flag = dict(zip(flags[::2], flags[1::2]))
    kw = {"limit": None, "cal_frames": 6, "noise_states": 2, "num_threads": 1, "offline": False, "offline_frames": None,
          "batch_size": 1, "momentum": 0.999, **{k: DEFAULTS[k] for k in labelled.CAL_OPTIONS}}
    setup = make_setup(load_bundle(path), datasets.coco_detection(flag["--annotations"], flag["--images"]),
                       datasets.image_files(flag["--calib-dir"]), kw,
                       processor_options={"conf_threshold": 0.005, "iou_threshold": 0.45})
    sweep = parallel_sweep.ShardedSweep(setup, pool, ShardCache(Path(out) / "shards"), 2, unit)
    records = sweep.run([("paper", [0.0, 0.5])], [0, 1], {"paper": {}}, labelled.ResultCache(Path(out) / "cache.jsonl"))
    return [(r["preset"], r["eta"], r["seed"], r["method"], r["metrics"], r["resampled"]) for r in records], sweep


def killed_mid_shard(tasks, pool, tmp_path):
    """The detection sweep on `pool` while the test SIGKILLs the worker of its first unit from outside."""
    faults = tmp_path / "faults"
    faults.mkdir()
    killer = threading.Thread(target=lambda: killed.append(kill_when_ready(faults)))
    killed = []
    killer.start()
    try:
        return sharded(tasks, pool, tmp_path / "out", functools.partial(killed_once, str(faults), run_unit))[0], killed
    finally:
        killer.join()


def test_a_local_worker_killed_mid_shard_is_retried_to_the_same_result(tasks, one_process, tmp_path):
    pool = LocalPool(2)
    records, killed = killed_mid_shard(tasks, pool, tmp_path)
    assert records == one_process["detection"]
    assert len(killed) == 1 and pool.restarts == 1


def test_a_ray_worker_killed_mid_shard_is_retried_to_the_same_result(ray_cluster, tasks, one_process, tmp_path):
    from edge_cbn.cluster.ray_pool import RayPool

    records, killed = killed_mid_shard(tasks, RayPool(ray_cluster), tmp_path)
    assert records == one_process["detection"] and len(killed) == 1


def test_finished_shards_resume_an_interrupted_sweep(tasks, one_process, tmp_path):
    records, sweep = sharded(tasks, LocalPool(1), tmp_path)
    # 2 etas x 2 seeds: a calibration each, and 6 images in 3 shards for each of the 2 methods
    assert records == one_process["detection"] and sweep.units_done == 4 * (1 + 2 * 3)
    (tmp_path / "cache.jsonl").unlink()  # the merged results are gone, the units on disk stay
    shard_files = sorted((tmp_path / "shards").glob("*.json"))
    shard_files[0].unlink()
    records, sweep = sharded(tasks, LocalPool(1), tmp_path)
    assert records == one_process["detection"] and sweep.units_done == 1


def test_shards_that_fail_their_check_are_computed_again(tasks, one_process, tmp_path):
    """A shard edited on disk, statistics replaced by NaN ones with a valid-looking file, and a planted
    entry are each computed again (before, NaN statistics turned a calibrated mAP of 63.94 into 0.0)."""
    sharded(tasks, LocalPool(1), tmp_path)
    (tmp_path / "cache.jsonl").unlink()
    results, stats = sorted((tmp_path / "shards").glob("*.json")), sorted((tmp_path / "shards").glob("*.npz"))
    edited = results[0].read_bytes().replace(b'"', b"'", 1)
    results[0].write_bytes(edited)
    cache = ShardCache(tmp_path / "shards")
    key = stats[0].stem
    bad = {bn: (np.full_like(m, np.nan), v) for bn, (m, v) in cache.get_stats(key).items()}
    ShardCache(tmp_path / "planted").put_stats(key, bad)  # authentic under another folder's secret only
    stats[0].write_bytes((tmp_path / "planted" / stats[0].name).read_bytes())
    records, sweep = sharded(tasks, LocalPool(1), tmp_path)
    assert records == one_process["detection"] and sweep.units_done == 2 and sweep.shards.rejected == 2
