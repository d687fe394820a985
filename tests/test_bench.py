"""`edge-cbn bench stream` end to end on a tiny exported model: every figure the issue names is in the
JSON line (a smoke test of the command; the figures themselves are timings, not asserted)."""
import json

import pytest
from click.testing import CliRunner

pytest.importorskip("keras")

from edge_cbn.lab.bench.command import bench  # noqa: E402
from edge_cbn.convert.export import export  # noqa: E402
from tiny import PRE, tiny_model  # noqa: E402


def test_bench_stream_reports_every_figure(tmp_path):
    path = export(tiny_model(num_classes=4), tmp_path / "m.tflite", name="tiny", task="classification",
                  preprocess=PRE, labels=list("abcd"))
    res = CliRunner().invoke(bench, ["stream", "--model", str(path), "--frames", "20", "--rounds", "3",
                                     "--num-threads", "1", "--memory-frames", "30", "--camera-fps", "100"])
    assert res.exit_code == 0, res.output
    fig = json.loads(res.output.strip().splitlines()[-1])
    for key in ("raw_fps", "stream_fps", "noisy_stream_fps", "calibrating_fps", "tracking_fps", "calibrating_ratio",
                "tracking_ratio", "noise_ms_per_frame", "camera_calibrating_fps", "camera_calibrating_ratio",
                "served_frame_cpu_ms", "calibration_frame_cpu_ms"):
        assert fig[key] > 0, key
    # paced: no faster than the camera, but for the frames read ahead at the start
    assert fig["camera_fps"] == 100 and 0 < fig["camera_noisy_fps"] <= 115
    assert fig["rounds"] == 3 and len(fig["stream_ratios"]) == 3
    assert fig["stream_ratio"] == pytest.approx(sorted(fig["stream_ratios"])[1], abs=1e-3)
    assert fig["calibrating_frames"] > 0 and fig["tracking_frames"] == 4 * 20
    # calibrated within the frames that calibrate densely, at a frame that is the same in every run
    assert 0 < fig["calibrated_frame"] < fig["calibrating_frames"] and fig["calibrated_seconds"] > 0
    assert 0 < fig["warmup_worker_cpu_s"] < fig["warmup_cpu_s"]  # the calibration's share of the warm-up's CPU
    assert fig["camera_calibrated_seconds"] >= fig["calibrated_frame"] / 115
    rss = fig["peak_rss_mb"]  # each configuration in its own process: the noisier, the larger
    assert len(rss) == 4 and all(mb > 30 for mb in rss.values())
    clean, defaults = rss["clean (no --noise)"], rss["calibrating, agreement every 10 (defaults)"]
    assert clean < defaults


@pytest.mark.slow
def test_bench_calibrate_reports_speed_memory_and_the_statistics_check(tmp_path):
    """`bench calibrate` on a few images: edge-cbn's figures, the in-graph statistics within 1e-5 of the
    float64 reduction, and the torch side reported as skipped when its Python cannot run it."""
    no_torch = tmp_path / "python-without-torch"
    no_torch.write_text("#!/bin/sh\necho 'No module named torchvision' >&2\nexit 1\n")
    no_torch.chmod(0o755)
    res = CliRunner().invoke(bench, ["calibrate", "--models", "mobilenet_v2", "--images", "6", "--batch-size", "2",
                                     "--large-batch", "6", "--torch-python", str(no_torch)])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])["models"]["mobilenet_v2"]
    assert row["edge_cbn"]["images"] == 6 and row["edge_cbn"]["images_per_s"] > 0
    assert row["edge_cbn"]["peak_rss_mb"] > 100 and row["edge_cbn_large"]["peak_rss_mb"] > 100
    assert row["check"]["max_rel_diff"] <= 1e-5
    assert "torchvision" in row["torch"]["error"] and row["ratio"] is None
    assert "skipped" in res.output


def test_bench_converge_reads_the_curve_off_the_log():
    """Agreement over the clip loop ending at each frame, the converged level over the last third, and the
    first frame (and its second) at which each share of the recovery is reached: on a made-up log whose
    served agreement steps from 40 % to 80 % at frame 400."""
    from edge_cbn.lab.bench.converge import convergence, without_timing

    lines = []
    for i in range(1200):
        line = {"frame": i, "t": i / 100, "latency_ms": 1.0}
        if i % 2 == 0:
            line["agreement"] = {"before": 40.0, "after": 80.0 if i >= 400 else 40.0}
        lines.append(line)
    row = convergence(lines)
    assert row["uncalibrated"] == 40.0 and row["converged"] == 80.0
    # the 140-frame window ending at n holds (n - 400) / 140 of the recovered samples
    assert row["to_share"]["50%"] == {"frame": 470, "seconds": 4.69}
    assert row["to_share"]["90%"]["frame"] == 530
    assert row["at"] == {300: 40.0, 600: 80.0, 1000: 80.0}
    summary = {"fps": 3.0, "agreement_after": 80.0}
    assert without_timing(lines, summary) == without_timing([dict(x, t=0) for x in lines], {**summary, "fps": 9})
