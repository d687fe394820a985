"""`edge-cbn stream`: the loop end to end on a tiny exported classifier (no default-model build): log and
summary, noise + calibration + refolds, state save/resume, a kill during a save, sources that fail or
have corrupt frames, the preview's /status, and no TensorFlow on the device side."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edge_cbn.runtime.bundle import load_bundle
from edge_cbn.runtime.interpreter import make_interpreter
from edge_cbn.runtime.state import StateStore, calibrated_model_path, fingerprint
from edge_cbn.stream.agreement import agreement
from edge_cbn.stream.command import main
from preview_poll import free_port, polled

SUMMARY_KEYS = {"frames", "fps", "refolds", "agreement_before", "agreement_after", "agreement_metric", "calibrated"}
NOISY = ["--noise", "relative", "--eta", "0.05", "--refold-every", "2", "--stages", "2", "--track-every", "1",
         "--calibrate-every", "1"]


def export_tiny(path: Path) -> Path:
    """A small conv+BN+ReLU classifier with random weights and BN statistics, exported with its sidecar and
    calibration variant (a few seconds; imports Keras/TensorFlow in this process only)."""
    keras = pytest.importorskip("keras")
    from keras import layers

    from edge_cbn.convert.export import export
    from edge_cbn.convert.weights.assign import assign_state_dict, random_state_dict

    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, 2, padding="same", use_bias=False, name="stem.conv")(inp)
    x = layers.ReLU()(layers.BatchNormalization(name="stem.bn")(x))
    x = layers.DepthwiseConv2D(3, 1, padding="same", use_bias=False, name="b1.dw")(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization(name="b1.dw_bn")(x))
    x = layers.Conv2D(16, 1, use_bias=False, name="b1.pw")(x)
    x = layers.ReLU()(layers.BatchNormalization(name="b1.pw_bn")(x))
    x = layers.Conv2D(16, 3, 2, padding="same", use_bias=False, name="b2.conv")(x)
    x = layers.ReLU()(layers.BatchNormalization(name="b2.bn")(x))
    x = layers.Dense(10, name="fc")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, x)
    assign_state_dict(model, random_state_dict(model, 0))
    pre = {"mean": [127.5] * 3, "std": [64.0] * 3, "letterbox": False}
    return export(model, path, name="tiny", task="classification", preprocess=pre,
                  labels=[f"class{i}" for i in range(10)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(export_tiny(tmp_path_factory.mktemp("model") / "tiny.tflite"))


def run(args, **kw):
    result = CliRunner().invoke(main, args, catch_exceptions=False, **kw)
    return result


def read_log(path):
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [x for x in lines if "summary" not in x], lines[-1].get("summary")


def test_headless_log_and_record(tiny, tmp_path):
    log, video = tmp_path / "s.jsonl", tmp_path / "out.mp4"
    r = run(["--model", tiny, "--frames", "30", "--headless", "--log", str(log), "--record", str(video)])
    assert r.exit_code == 0, r.output
    frames, summary = read_log(log)
    assert [f["frame"] for f in frames] == list(range(30))
    assert all({"frame", "latency_ms", "calibrating", "refolds", "top"} <= set(f) for f in frames)
    assert frames[0]["top"][0].startswith("class") and not any(f["calibrating"] for f in frames)
    assert SUMMARY_KEYS <= set(summary) and summary["frames"] == 30 and summary["fps"] > 0
    assert summary["agreement_before"] is None and summary["calibrated"] is False
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"summary": summary}
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 30
    cap.release()


def test_noise_calibrates_and_refolds(tiny, tmp_path):
    log = tmp_path / "s.jsonl"
    r = run(["--model", tiny, "--frames", "40", "--headless", "--log", str(log), *NOISY, "--calibrate",
             "--agreement-every", "4", "--calibrate-every", "2"])
    assert r.exit_code == 0, r.output
    frames, summary = read_log(log)
    assert len(frames) == 40
    assert [f["calibrating"] for f in frames[:4]] == [True, False, True, False]  # --calibrate-every 2
    assert frames[-1]["refolds"] >= 1 and frames[-1]["progress"] == 1.0
    assert any("agreement" in f for f in frames)
    assert summary["calibrated"] is True and summary["refolds"] == frames[-1]["refolds"]
    assert summary["agreement_metric"] == "top1_agreement" and summary["agreement_samples"] == 5
    assert 0 <= summary["agreement_before"] <= 100 and 0 <= summary["agreement_after"] <= 100


def test_state_save_resume_and_corrupt_state(tiny, tmp_path):
    state = tmp_path / "st.npz"
    args = ["--model", tiny, "--headless", *NOISY, "--state", str(state)]
    r = run([*args, "--frames", "20"])
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout.strip().splitlines()[-1])["summary"]
    assert first["refolds"] >= 2 and not first["resumed"]
    model = calibrated_model_path(state)
    cal = load_bundle(model, require_sidecar=True)  # an ordinary bundle: sidecar with the calibrated stats
    make_interpreter(model_path=model)
    src = load_bundle(tiny)
    assert any(not np.array_equal(a.var, b.var) for a, b in zip(cal.layers, src.layers) if a.bn)

    log = tmp_path / "s2.jsonl"
    r = run([*args, "--frames", "10", "--log", str(log)])
    assert r.exit_code == 0, r.output
    frames, second = read_log(log)
    assert second["resumed"] and second["calibrated"]
    assert frames[0]["refolds"] >= first["refolds"] and second["refolds"] > first["refolds"]
    assert frames[0]["progress"] == 1.0  # the warm-up is not repeated

    state.write_bytes(b"not an npz at all")
    r = run([*args, "--frames", "6"])
    assert r.exit_code == 0, r.output
    assert "not used" in r.stderr and "starting fresh" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["summary"]["resumed"] is False
    r = run([*args, "--frames", "2"])  # the bad file was replaced by a good one
    assert json.loads(r.stdout.strip().splitlines()[-1])["summary"]["resumed"] is True


def test_noise_option_is_part_of_the_chip_and_bad_ones_are_clear(tiny, tmp_path):
    args = ["--model", tiny, "--headless", *NOISY, "--state", str(tmp_path / "st.npz"), "--frames", "6"]
    assert run(args).exit_code == 0
    r = run([*args, "--noise-option", "t_granularity=weight"])  # another chip: the saved state is not its
    assert r.exit_code == 0, r.output
    assert "noise_options" in r.stderr and "starting fresh" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["summary"]["noise_options"] == {"t_granularity": "weight"}
    r = CliRunner().invoke(main, ["--model", tiny, *NOISY, "--noise-option", "spatial_level=0.2"])
    assert r.exit_code == 2 and "--noise-option" in r.output and "temporal_level" in r.output


def _start(args, log, env):
    """The stream in a subprocess, once it has logged a few frames."""
    if log.exists():
        log.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "edge_cbn.stream", *args, "--frames", "100000", "--log", str(log)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the stream did not start: {proc.communicate()[1].decode()[-2000:]}")


def test_sigterm_stops_cleanly_and_kill_during_save_resumes(tiny, tmp_path):
    """SIGTERM: the stream finishes, saves and exits 0.  SIGKILL in the middle of a save (each file write
    paused half-way by the test hook): the files on disk stay loadable and a restart resumes from them."""
    state = tmp_path / "st.npz"
    log = tmp_path / "s.jsonl"
    args = ["--model", tiny, "--headless", "--quiet", "--noise", "relative", "--eta", "0.05", "--warmup-frames", "2",
            "--calibrate-every", "1", "--save-interval", "0", "--state", str(state)]
    proc = _start(args, log, dict(os.environ))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    frames, summary = read_log(log)
    assert summary["frames"] == len(frames) >= 3 and json.loads(out)["summary"] == summary
    assert state.exists() and calibrated_model_path(state).exists()

    # SIGKILL as soon as a save's temporary file shows (each write pauses half-way, so it is caught mid-write).
    proc = _start(args, log, {**os.environ, "EDGE_CBN_TEST_SLOW_SAVE": "0.2"})
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not list(tmp_path.glob(".*.tmp")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert list(tmp_path.glob(".*.tmp")), "the kill never hit a save in progress"

    bundle = load_bundle(tiny)
    fp = fingerprint(bundle, noise="relative", eta=0.05, seed=0, mode="shift", stages=2, sweep=True)
    saved = StateStore(state, bundle, fp).load()  # loadable, whether or not the model beside it is newer
    assert saved.counters["refolds"] >= summary["refolds"]
    make_interpreter(model_path=calibrated_model_path(state))
    load_bundle(calibrated_model_path(state), require_sidecar=True)

    r = run([*args, "--frames", "5", "--log", str(log)])
    assert r.exit_code == 0, r.output
    frames, summary = read_log(log)
    assert summary["resumed"] and frames[0]["refolds"] >= saved.counters["refolds"]
    assert not list(tmp_path.glob(".*.tmp"))  # the killed save's temporaries are cleaned up


def test_missing_video_is_one_clear_error(tiny, tmp_path):
    r = CliRunner().invoke(main, ["--model", tiny, "--video", str(tmp_path / "nope.mp4")])
    assert r.exit_code != 0
    assert r.output.strip().splitlines() == [f"Error: {tmp_path / 'nope.mp4'}: video file not found"]
    r = CliRunner().invoke(main, ["--model", tiny, "--camera", "57"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and "camera 57" in r.output
    from edge_cbn.cli import main as edge_cbn_main  # a model that is not there is BadInput: the root's one line

    r = CliRunner().invoke(edge_cbn_main, ["stream", "--model", str(tmp_path / "nope.tflite")])
    assert r.exit_code == 1 and "does not exist" in r.output and len(r.output.strip().splitlines()) == 1


def test_video_with_corrupt_frame_still_streams(tiny, tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(12):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    data[starts[5]:starts[6] - 16] = np.random.default_rng(0).integers(0, 256, starts[6] - 16 - starts[5],
                                                                          dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    log = tmp_path / "s.jsonl"
    r = run(["--model", tiny, "--video", str(path), "--headless", "--log", str(log)])
    assert r.exit_code == 0, r.output
    frames, summary = read_log(log)
    assert len(frames) == summary["frames"] == 11


def test_preview_draws_a_live_fig1_of_the_calibration(tiny):
    """Per BN layer, the shift of its input statistics under noise: the first layer's is the same with and
    without calibration (nothing before it is calibrated); after calibration the layers behind it shift
    less than uncalibrated."""
    port = free_port()
    r, seen = polled(port, lambda: run(["--model", tiny, "--headless", "--serve", str(port), "--frames", "200",
                                        "--agreement-every", "5", *NOISY]), paths=("status", "history"))
    assert r.exit_code == 0, r.output
    shift = seen[-1][1]["layer_shift"]
    bns = [rec.bn for rec in load_bundle(tiny).layers if rec.bn]
    assert shift["layers"] == bns and shift["samples"] >= 10
    unc, cal = np.array(shift["uncalibrated"]), np.array(shift["calibrated"])
    assert np.isfinite(unc).all() and np.isfinite(cal).all() and (unc >= 0).all() and (cal >= 0).all()
    assert cal[0] == unc[0] and unc[1:].mean() > 0
    assert cal[1:].mean() < unc[1:].mean()


def test_preview_status_updates_during_run(tiny, tmp_path):
    port = free_port()
    r, seen = polled(port, lambda: run(["--model", tiny, "--headless", "--serve", str(port), "--frames", "300",
                                         *NOISY]))
    seen = [status for status, in seen]
    assert r.exit_code == 0, r.output
    counts = [s["frames"] for s in seen]
    assert len(set(counts)) >= 2 and counts == sorted(counts)
    last = seen[-1]
    assert {"fps", "calibration", "calibration_progress", "refolds", "noise", "result", "model", "task",
            "source"} <= set(last)
    assert last["model"] == "tiny" and last["noise"].startswith("noise relative") and last["published"] >= 1


def test_agreement_metrics():
    assert agreement("classification", [(3, "a", 0.9)], [(3, "a", 0.5)]) == 100.0
    assert agreement("classification", [(3, "a", 0.9)], [(4, "b", 0.5)]) == 0.0
    ref = [(0, "p", 0.9, (0, 0, 10, 10)), (1, "q", 0.8, (20, 20, 30, 30))]
    assert agreement("detection", ref, ref) == 100.0
    assert agreement("detection", [], []) == 100.0
    moved = [(0, "p", 0.9, (1, 1, 11, 11)), (0, "p", 0.7, (20, 20, 30, 30))]  # second: wrong class
    assert agreement("detection", ref, moved) == pytest.approx(50.0)
    assert agreement("segmentation", np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 0]])) == 50.0


@pytest.mark.parametrize("schedule", [["--no-sweep", "--refold-every", "8"], ["--warmup-frames", "16"]])
def test_calibration_slows_down_after_the_warm_up_and_once_converged(tiny, tmp_path, schedule):
    """--calibrate-every 1 until the stream sees the warm-up's end (16 calibration frames: 2 depth-first stages
    of 8 frames, or 16 sweep frames), then the cadence's second pass until converged, then every
    TRACKING_EVERY-th frame."""
    from edge_cbn.stream.options import TRACKING_EVERY, Cadence
    from edge_cbn.stream.pipeline import LAG

    log = tmp_path / "c.jsonl"
    n, warm_up = 600, 16
    r = run(["--model", tiny, "--frames", str(n), "--headless", "--log", str(log), *NOISY, "--agreement-every", "0",
             *schedule])
    assert r.exit_code == 0, r.output
    cadence = Cadence.of(1, sweep="--no-sweep" not in schedule)
    frames, summary = read_log(log)
    warm = summary["calibrated_at_frame"]
    assert warm == warm_up - 1 + LAG  # every frame: the 16th calibration frame ends the warm-up
    assert frames[warm - 1]["progress"] < 1.0 == frames[warm]["progress"]
    steps = np.diff([i for i, f in enumerate(frames) if f["calibrating"]])
    converged = cadence.converged_warmups * warm_up
    assert list(steps[:warm]) == [1] * warm  # frames 0 .. warm calibrate
    assert list(steps[warm:converged]) == [cadence.second_every] * (converged - warm)
    assert len(steps) > converged and set(steps[converged:]) == {TRACKING_EVERY}
    assert summary["calibration"].startswith(f"calibrated at frame {warm}")


def stream_log(tiny, log, n, *, background=True, slow_worker=None, states=3, sweep=False):
    """(per-frame log lines, summary) of an `Engine` over `n` frames of the sample clip, without the timings;
    the worker thread optionally slowed by `slow_worker()` seconds before each calibration frame."""
    from edge_cbn.lab.bench.converge import without_timing
    from edge_cbn.stream import Engine, StreamLoop, StreamOptions, open_frames

    opts = StreamOptions(noise="relative", eta=0.05, num_threads=1, headless=True, quiet=True, frames=n, log=str(log),
                         agreement_every=5, calibrate_every=2, stages=2, refold_every=2, noise_states=states,
                         sweep=sweep, warmup_frames=4)
    engine = Engine(load_bundle(tiny), opts, background=background)
    if slow_worker is not None:
        calibrate = engine.pipeline._calibrate
        engine.pipeline._calibrate = lambda *a: (time.sleep(slow_worker()), calibrate(*a))[1]
    with open_frames() as source:
        StreamLoop(engine, source, opts, model_name="tiny").run()
    return without_timing(*read_log(log))


@pytest.mark.parametrize("sweep", [False, True])
def test_calibration_is_a_function_of_the_frames_not_the_clock(tiny, tmp_path, sweep):
    """The same frames give the same predictions, calibration flags, refolds, agreement and summary
    whether calibration runs beside serving, in its thread, or on a worker made slow at random: which
    frames calibrate and when their statistics serve are decided by frame index."""
    inline = stream_log(tiny, tmp_path / "a.jsonl", 300, background=False, sweep=sweep)
    threaded = stream_log(tiny, tmp_path / "b.jsonl", 300, sweep=sweep)
    rng = random.Random(0)
    slowed = stream_log(tiny, tmp_path / "c.jsonl", 300, slow_worker=lambda: rng.choice([0, 0, 0.01, 0.05]),
                        sweep=sweep)
    frames, summary = inline
    if sweep:  # 4 warm-up frames (0-6, a refold each: the stream sees the warm-up's end at frame 6 + LAG),
        # 13 more every 2nd frame until the stream has handed out four times the warm-up's frames (8-32), then
        # every 256th frame (288: its result comes 128 frames later, after the run)
        assert summary["refolds"] == 17 and summary["calibrated_at_frame"] == 14
    else:  # 2 warm-up refolds (frames 2, 6), 4 more until twice the warm-up's 4 calibration frames are in
        # (frames 8-14: the stream sees the warm-up's end at frame 14), then one every 256 frames (18, 274),
        # each seen 128 frames later (one within the run); serving updated state by state from the warm-up's
        # end (frames 14, 22, 30)
        assert summary["refolds"] == 7 and summary["calibrated_at_frame"] == 14
    assert [f["calibrating"] for f in frames[:6]] == [True, False] * 3  # calibrate_every 2, by index
    assert sum("agreement" in f for f in frames) == 60
    assert threaded == inline and slowed == inline


def test_exact_noise_takes_new_statistics_at_the_same_frame_in_either_thread(tiny, tmp_path):
    """Exact per-frame noise (no noise states): new statistics are taken in one step, at a frame fixed by index."""
    inline = stream_log(tiny, tmp_path / "a.jsonl", 60, background=False, states=0, sweep=True)
    assert stream_log(tiny, tmp_path / "b.jsonl", 60, states=0, sweep=True) == inline and inline[1]["refolds"] >= 6


def test_calibration_budget_is_gone_with_a_notice(tiny):
    r = run(["--model", tiny, "--frames", "2", "--headless", "--noise", "relative", "--calibration-budget", "0.2"])
    assert r.exit_code == 0 and "--calibration-budget is gone" in r.output


@pytest.mark.parametrize("states", [3, 0])
def test_statistics_that_serve_non_finite_outputs_are_rolled_back(tiny, tmp_path, states):
    """New serving statistics are checked on their calibration frame when their first state is built:
    folded means of 3e38 overflow the biases, the probe sees non-finite outputs, and the serving model keeps
    its statistics (every frame served finite), counted in the summary; noise states and exact noise alike."""
    from edge_cbn.stream import Engine, StreamLoop, StreamOptions, open_frames

    log = tmp_path / "r.jsonl"
    opts = StreamOptions(noise="relative", eta=0.05, num_threads=1, headless=True, quiet=True, frames=80,
                         log=str(log), agreement_every=0, calibrate_every=2, stages=2, refold_every=2,
                         noise_states=states)
    engine = Engine(load_bundle(tiny), opts)
    step = engine.calibration.step

    def overflowing_step(x, frame):
        outputs, stats = step(x, frame)
        return outputs, stats and {bn: (np.full_like(m, -3e38), v) for bn, (m, v) in stats.items()}

    engine.calibration.step = overflowing_step
    with open_frames() as source:
        StreamLoop(engine, source, opts, model_name="tiny").run()
    frames, summary = read_log(log)
    assert summary["refolds"] > 2 and summary["rollbacks"] >= 1
    assert all(np.isfinite(f["top"][1]) for f in frames)


def test_serving_statistics_change_at_frames_fixed_by_index(tiny):
    """With the sweep, the serving model takes the 1st refold's statistics LAG frames after the stream sees
    it (state 0 first), one update at a time after that: the newest waiting wins (the warm-up's end, the
    4th refold, replaces the 2nd's while the 1st's three states are built; the 16th replaces the 8th's)."""
    from edge_cbn.stream import Engine, StreamOptions, open_frames
    from edge_cbn.stream.pipeline import LAG

    opts = StreamOptions(noise="relative", eta=0.05, num_threads=1, headless=True, quiet=True, agreement_every=0,
                         calibrate_every=2, noise_states=3, sweep=True, warmup_frames=4)
    engine = Engine(load_bundle(tiny), opts, background=False)
    changes, served = [], engine.serving.stats()
    with open_frames() as source:
        for i in range(80):
            engine.process(source.read(), i)
            stats = engine.serving.stats()
            if any(stats[bn][0] is not served[bn][0] for bn in stats):
                changes.append(i)
                served = stats
    engine.close()
    assert engine.status.calibrated_frame == 6 + LAG  # the 4th calibration frame (frame 6) ends the warm-up
    # each update: seen at c + LAG, state 0 serves LAG later, its last state 2 LAG after that
    assert changes == [2 * LAG, 5 * LAG, 8 * LAG] and engine.refolds >= 16
