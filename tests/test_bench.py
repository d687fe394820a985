"""`edge-cbn bench stream` end to end on a tiny exported model: every figure the issue names is in the
JSON line (a smoke test of the command; the figures themselves are timings, not asserted)."""
import json

import pytest
from click.testing import CliRunner

pytest.importorskip("keras")

from edge_cbn.lab.bench import bench  # noqa: E402
from edge_cbn.convert.export import export  # noqa: E402
from tiny import PRE, tiny_model  # noqa: E402


def test_bench_stream_reports_every_figure(tmp_path):
    path = export(tiny_model(num_classes=4), tmp_path / "m.tflite", name="tiny", task="classification",
                  preprocess=PRE, labels=list("abcd"))
    res = CliRunner().invoke(bench, ["stream", "--model", str(path), "--frames", "20", "--rounds", "3",
                                     "--num-threads", "1"])
    assert res.exit_code == 0, res.output
    fig = json.loads(res.output.strip().splitlines()[-1])
    for key in ("raw_fps", "stream_fps", "noisy_stream_fps", "calibrating_fps", "noise_ms_per_frame"):
        assert fig[key] > 0, key
    assert fig["rounds"] == 3 and len(fig["stream_ratios"]) == 3
    assert fig["stream_ratio"] == pytest.approx(sorted(fig["stream_ratios"])[1], abs=1e-3)
    assert fig["calibrating_refuses"] >= 1 and fig["calibrating_frames"] > 0
