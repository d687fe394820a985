"""`edge-cbn bench sweep`: the JSON line has every figure (timings are not asserted: they belong to the
command's run, docs/BENCHMARKS.md), the three configurations give the same metrics, and the projection's
arithmetic on known costs."""
import json

import pytest
from click.testing import CliRunner

pytest.importorskip("keras")
pytest.importorskip("skimage")

from edge_cbn.lab.bench.command import bench  # noqa: E402
from edge_cbn.lab.bench.sweep import per_image_costs  # noqa: E402
from edge_cbn.lab.bench.sweep_projection import CAL_FRAMES, project  # noqa: E402
from tiny import PRE, tiny_model  # noqa: E402


def test_bench_sweep_reports_every_figure(ray_cluster, tmp_path):
    from edge_cbn.convert.export import export

    path = export(tiny_model(num_classes=10), tmp_path / "m.tflite", name="tiny", task="classification",
                  preprocess=PRE, labels=[f"c{i}" for i in range(10)])  # the synthetic folder's 10 classes
    res = CliRunner().invoke(bench, ["sweep", "--model", str(path), "--images", "12", "--seeds", "0,1",
                                     "--cal-frames", "4", "--shard-size", "4", "--rounds", "1", "--ray", ray_cluster,
                                     "--project", ""])
    assert res.exit_code == 0, res.output
    fig = json.loads(res.output.strip().splitlines()[-1])
    for times in (fig["wall_s"], fig["sweep_s"]):
        assert set(times) == {"workers_1", "workers_2", "ray"} and all(s > 0 for s in times.values())
    assert all(fig["sweep_s"][k] < fig["wall_s"][k] for k in fig["wall_s"])
    assert fig["same_metrics"] is True
    assert fig["speedup_2_workers"] > 0 and fig["ray_vs_2_workers"] > 0
    costs = fig["costs"][str(path)]
    assert costs["eval_s_per_image"] > 0 and costs["calibration_s_per_frame"] >= 0  # ms on the tiny model
    assert "speedup 1 -> 2 workers" in res.output


def test_per_image_costs_from_the_records():
    """Original: 2 s for 100 images; calibrated: the same plus 10 frames of 0.5 s."""
    result = {"images": 100, "cal_frames": 10, "records": [
        {"method": "original", "seconds": 2.0}, {"method": "calibrated", "seconds": 7.0},
        {"method": "original", "seconds": 2.0}, {"method": "calibrated", "seconds": 7.0}]}
    assert per_image_costs(result) == {"eval_s_per_image": 0.02, "calibration_s_per_frame": 0.5}


def test_projection_arithmetic():
    table = {"images": 1000, "etas": 2, "methods": 3, "models": ["a"]}
    costs = {"a": {"eval_s_per_image": 0.01, "calibration_s_per_frame": 0.1, "offline_s_per_image": 0.2}}
    p = project(table, costs)
    seconds = (3 * 1000 * 0.01 + CAL_FRAMES * 0.3) * 2 * p["seeds"]
    assert p["cpu_hours"] == round(seconds / 3600, 1)
    assert p["wall_hours_on_nodes_x_cpus"]["4x2"] == round(seconds / 3600 / 8, 2)
    # on 16 nodes of 16 CPUs the longest unit, one offline calibration of CAL_FRAMES images, is the floor
    assert p["wall_hours_on_nodes_x_cpus"]["16x16"] == round(CAL_FRAMES * 0.2 / 3600, 2) == round(
        p["longest_unit_hours"], 2)
