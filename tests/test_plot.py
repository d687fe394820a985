"""`edge-cbn plot LOG.jsonl`: a stream's --log read into series, drawn as a PNG, and a file that is no
stream log refused in one line."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edge_cbn.lab.plot import main, read_log, running_mean
from edge_cbn.runtime.errors import BadInput


def write_log(path, frames=60, every=5, calibrated_at=20, cut=False):
    """A log as `edge-cbn stream --log` writes it: a frame line each (an agreement sample every `every`,
    the refold count rising every 4th frame), then the summary."""
    lines = []
    for i in range(frames):
        line = {"frame": i, "t": round(0.05 * i, 3), "latency_ms": 10.0 + i % 3, "calibrating": i % 2 == 0,
                "refolds": i // 4, "top": ["cat", 0.5], "progress": min(1.0, i / calibrated_at)}
        if i % every == every - 1:
            line["agreement"] = {"frame": i, "clean": "cat", "uncalibrated": "dog", "served": "cat",
                                 "before": 40.0, "after": 40.0 + i}
        lines.append(json.dumps(line))
    if not cut:
        lines.append(json.dumps({"summary": {"frames": frames, "agreement_before": 40.0, "agreement_after": 80.0,
                                             "calibrated_at_frame": calibrated_at}}))
    text = "\n".join(lines) + "\n"
    path.write_text(text[:-30] if cut else text)
    return path


def test_a_log_becomes_the_series_the_charts_draw(tmp_path):
    log = read_log(write_log(tmp_path / "shift.jsonl"))
    assert log.name == "shift" and len(log.frame) == 60 and log.calibrated_at == 20
    np.testing.assert_array_equal(log.sample_frame, np.arange(4, 60, 5))
    np.testing.assert_array_equal(log.after, 40.0 + np.arange(4, 60, 5))
    np.testing.assert_array_equal(log.refold_frames(), np.arange(4, 60, 4))
    np.testing.assert_allclose(log.fps()[30:], 20.0)  # 30 frames in 1.5 s
    assert np.isnan(log.fps()[:30]).all()
    # The running mean covers the samples of the last 140 frames: here all of them so far.
    np.testing.assert_allclose(running_mean(log.sample_frame, log.after), 40.0 + np.cumsum(np.arange(4, 60, 5)) /
                               np.arange(1, 13))


def test_plot_writes_a_png_and_compares_two_logs(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = write_log(tmp_path / "shift.jsonl"), write_log(tmp_path / "absolute.jsonl", calibrated_at=30)
    res = CliRunner().invoke(main, [str(a), "--compare", str(b), "-o", str(tmp_path / "cmp.png")])
    assert res.exit_code == 0, res.output
    png = (tmp_path / "cmp.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert "shift: 60 frames, 12 agreement samples, 40.0% -> 80.0%, calibrated at frame 20" in res.stderr
    res = CliRunner().invoke(main, [str(a)])  # default: beside the log
    assert res.exit_code == 0 and (tmp_path / "shift.png").is_file()


def test_a_log_cut_by_a_kill_reads_up_to_its_last_whole_line(tmp_path):
    log = read_log(write_log(tmp_path / "killed.jsonl", cut=True))
    assert len(log.frame) == 59 and log.summary == {} and log.calibrated_at is None


@pytest.mark.parametrize("content, reason", [
    (b"", "holds no frame lines"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\n{}\n", "line 1 is not JSON"),
    (b'{"frame": 0, "t": 0.0}\n', "neither a frame line nor the summary"),
    (b'[1, 2, 3]\n', "neither a frame line nor the summary"),
    (b'{"summary": {"frames": 0}}\n', "holds no frame lines"),
])
def test_a_file_that_is_no_stream_log_is_one_line(tmp_path, content, reason):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(BadInput, match=reason) as error:
        read_log(path)
    assert str(path) in str(error.value)
    assert CliRunner().invoke(main, [str(tmp_path / "missing.jsonl")]).exit_code != 0
