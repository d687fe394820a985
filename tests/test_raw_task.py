"""Task "raw": a model whose outputs edge-cbn does not interpret (a feature map and a vector here) loads,
streams (agreement = cosine similarity of the outputs with the clean model's, the log and summary naming
it, the preview's status intact) and runs `edge-cbn evaluate`; the labelled `evaluate TASK` refuses it."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_cbn.runtime.bundle import load_bundle
from edge_cbn.runtime.flatbuffer import ModelFacts
from edge_cbn.runtime.noisy_model import NoisyModel
from edge_cbn.runtime.processing import Processor, flat_outputs
from edge_cbn.runtime.validation import Invalid, check_meta
from edge_cbn.stream.agreement import AGREEMENT_METRICS, agreement, cosine_similarity, short_prediction
from edge_cbn.stream.outputs import describe, draw_prediction, log_fields
from preview_poll import free_port, polled

PRE = {"mean": [127.5] * 3, "std": [127.5] * 3, "letterbox": False}
NOISY = ["--noise", "relative", "--eta", "0.3", "--refold-every", "2", "--stages", "2", "--track-every", "1",
         "--calibrate-every", "1", "--calibrate", "--agreement-every", "4"]


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory):
    """A conv+BN model of two outputs, a (1, 4, 4, 7) map and a (1, 5) vector, exported with task "raw"."""
    keras = pytest.importorskip("keras")
    from keras import layers

    from edge_cbn.convert.export import export
    from edge_cbn.convert.weights.assign import assign_state_dict, random_state_dict

    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, 2, padding="same", use_bias=False, name="stem.conv")(inp)
    x = layers.ReLU()(layers.BatchNormalization(name="stem.bn")(x))
    x = layers.Conv2D(7, 3, 2, padding="same", use_bias=False, name="head.conv")(x)
    fmap = layers.BatchNormalization(name="head.bn")(x)
    vec = layers.Dense(5, name="fc")(layers.GlobalAveragePooling2D()(fmap))
    model = keras.Model(inp, [fmap, vec])
    assign_state_dict(model, random_state_dict(model, 0))
    path = tmp_path_factory.mktemp("raw") / "tiny.tflite"
    return str(export(model, path, name="tiny", task="raw", preprocess=PRE, labels=[]))


def frame(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (24, 30, 3), np.uint8)


def test_bundle_loads_and_postprocess_returns_copies_of_the_outputs(raw_model):
    bundle = load_bundle(raw_model)
    assert bundle.meta["task"] == "raw" and bundle.meta["labels"] == []
    proc = Processor(bundle)
    x, ctx = proc.preprocess(frame())
    outputs = NoisyModel(bundle, None, num_threads=1).run(x, 0)
    pred = proc.postprocess(outputs, ctx)
    assert [p.shape for p in pred] == [(1, 4, 4, 7), (1, 5)] and all(p.dtype == np.float32 for p in pred)
    assert all(np.array_equal(p, o) for p, o in zip(pred, outputs))
    outputs[0][...] = 0  # the interpreter's next invoke overwrites its arrays: the prediction keeps its values
    assert np.abs(pred[0]).sum() > 0
    assert flat_outputs(pred).shape == (4 * 4 * 7 + 5,) and flat_outputs(pred).dtype == np.float64


def test_meta_of_a_raw_model_takes_any_labels():
    facts = ModelFacts((1, 8, 8, 3), np.dtype(np.uint8), ((1, 3),), ())
    meta = {"format": 1, "model": "m", "task": "raw", "input_size": [8, 8], "preprocess": PRE, "labels": []}
    check_meta(meta, facts, 1)
    check_meta({**meta, "labels": ["a", "b", "c", "d"]}, facts, 1)  # not class names: not counted
    with pytest.raises(Invalid, match="labels for the model's 3 classes"):
        check_meta({**meta, "task": "classification", "labels": ["a", "b"]}, facts, 1)


def test_cosine_similarity_on_known_vectors():
    a = [np.float32([[1, 0], [0, 0]]), np.float32([0])]
    assert agreement("raw", a, a) == 100.0
    assert agreement("raw", a, [np.float32([[0, 1], [0, 0]]), np.float32([0])]) == 0.0  # orthogonal
    assert agreement("raw", a, [np.float32([[-2, 0], [0, 0]]), np.float32([0])]) == -100.0
    angle = [np.float32([[1, 1], [0, 0]]), np.float32([0])]  # 45 degrees
    assert agreement("raw", a, angle) == pytest.approx(100 / math.sqrt(2))
    assert agreement("raw", [np.float32([1, 2])], [np.float32([1]), np.float32([2])]) == 100.0  # concatenated
    zero = [np.zeros((2, 2), np.float32), np.float32([0])]
    assert agreement("raw", zero, zero) == 100.0 and agreement("raw", a, zero) == agreement("raw", zero, a) == 0.0
    assert cosine_similarity(np.float64([1, np.nan]), np.float64([1, 0])) == 0.0
    with pytest.raises(ValueError, match="cannot be compared"):
        cosine_similarity(np.ones(3), np.ones(4))
    assert AGREEMENT_METRICS["raw"] == "cosine_similarity"


def test_words_log_fields_and_overlay_of_a_raw_prediction():
    pred = [np.full((1, 2, 2, 3), 1.0, np.float32), np.float32([[3.0, 4.0]])]  # |y| = sqrt(12 + 25)
    assert describe("raw", pred) == f"raw: 2 outputs, |y| {math.sqrt(37):.3g}"
    assert log_fields("raw", pred) == {"norm": round(math.sqrt(37), 4)} == {"norm": short_prediction("raw", pred)}
    assert short_prediction("raw", [np.float32([np.inf])]) is None
    json.dumps(log_fields("raw", pred))
    canvas = np.zeros((120, 160, 3), np.uint8)
    assert draw_prediction(canvas, "raw", pred, []) is canvas and canvas.any()


def run_stream(args):
    from edge_cbn.stream.command import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_stream_reports_cosine_similarity(raw_model, tmp_path):
    log = tmp_path / "s.jsonl"
    r = run_stream(["--model", raw_model, "--frames", "40", "--headless", "--log", str(log), *NOISY])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    frames, summary = lines[:-1], lines[-1]["summary"]
    assert len(frames) == 40 and all(isinstance(f["norm"], float) for f in frames)
    samples = [f["agreement"] for f in frames if "agreement" in f]
    assert len(samples) == 10 and all(-100 <= s[k] <= 100 for s in samples for k in ("before", "after"))
    assert summary["task"] == "raw" and summary["agreement_metric"] == "cosine_similarity"
    assert summary["agreement_samples"] == 5 and summary["calibrated"] is True
    assert -100 <= summary["agreement_before"] < 100 and -100 <= summary["agreement_after"] <= 100
    assert "agreement (cosine_similarity)" in r.stderr


def test_preview_status_of_a_raw_stream(raw_model):
    port = free_port()
    r, seen = polled(port, lambda: run_stream(["--model", raw_model, "--headless", "--serve", str(port), "--frames",
                                                "300", *NOISY]), paths=("status", "history"))
    assert r.exit_code == 0, r.output
    status, history = seen[-1]
    assert status["task"] == "raw" and status["result"].startswith("raw: 2 outputs, |y| ")
    assert all(-100 <= v <= 100 for s in history["samples"] for v in s[1:] if v is not None)


@pytest.fixture
def generated_photos(monkeypatch):
    """`evaluate` on two generated images instead of the photos scikit-image ships."""
    import edge_cbn.lab.evaluate.command as ev

    rng = np.random.default_rng(0)
    photos = {f"gen{i}": rng.integers(0, 256, (40, 48, 3), np.uint8) for i in range(2)}
    monkeypatch.setattr(ev, "load_photos", lambda which="all": photos)


def test_evaluate_agreement_is_the_mean_cosine_similarity(raw_model, generated_photos):
    from edge_cbn.lab.evaluate.command import main

    res = CliRunner().invoke(main, ["--model", raw_model, "--cal-frames", "8", "--eval-crops", "6", "--checkpoints",
                                    "4,8", "--num-threads", "1", "--noise", "none:0", "--noise", "relative:0.3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["agreement_metric"] == "cosine_similarity" and out["confident_crops"] == 6  # every crop counts
    assert "cosine_similarity" in res.output
    rows = {r["preset"]: r for r in out["rows"]}
    assert rows["none"]["uncalibrated"] == rows["none"]["calibrated@8"] == 100.0
    noisy = rows["relative"]
    assert -100 <= noisy["uncalibrated"] < 100 and -100 <= noisy["calibrated@8"] <= 100
    assert all(noisy[k] == noisy[k + "_confident"] for k in ("uncalibrated", "calibrated@4", "calibrated@8"))


def test_evaluate_classification_refuses_a_raw_model(raw_model, tmp_path):
    from labelled_tiny import images, imagenet_folder, run_cli

    rng = np.random.default_rng(0)
    imagenet_folder(tmp_path / "val", [0], 1, rng)
    images(tmp_path / "cal", 1, rng)
    res, _ = run_cli("classification", Path(raw_model), tmp_path / "out", "--data", str(tmp_path / "val"),
                     "--calib-dir", str(tmp_path / "cal"))
    assert res.exit_code == 2 and "the model is a raw model, not classification" in res.output
