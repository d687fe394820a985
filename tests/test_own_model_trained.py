"""A CNN a user trains in Keras for a few seconds goes from its .keras file to a calibrating stream with
two commands (README 'Your own model'), and `evaluate classification` measures it on folders named by its
labels."""
import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

keras = pytest.importorskip("keras")

from edge_cbn.cli import main as cli  # noqa: E402
from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.runtime.noisy_model import NoisyModel  # noqa: E402
from own_models import SHAPES, shapes, trained_shape_classifier  # noqa: E402

pytestmark = pytest.mark.slow


def test_trained_cnn_converts_predicts_as_keras_and_calibrates_in_a_stream(tmp_path):
    model = trained_shape_classifier()
    held_out, truth = shapes(200, seed=1)
    keras_pred = np.argmax(model.predict(held_out.astype(np.float32), verbose=0), axis=1)
    assert np.mean(keras_pred == truth) >= 0.6  # it learned something: chance is 1/3
    model.save(tmp_path / "shapes.keras")
    (tmp_path / "labels.txt").write_text("\n".join(SHAPES) + "\n")

    r = CliRunner().invoke(cli, ["convert", "--keras", str(tmp_path / "shapes.keras"), "--labels",
                                 str(tmp_path / "labels.txt"), "-o", str(tmp_path / "shapes.tflite")])
    assert r.exit_code == 0, r.output
    bundle = load_bundle(tmp_path / "shapes.tflite")
    assert bundle.meta["labels"] == list(SHAPES) and bundle.can_calibrate
    clean = NoisyModel(bundle)
    tflite_pred = [int(np.argmax(clean.run(img[None], i)[0])) for i, img in enumerate(held_out)]
    assert np.mean(np.array(tflite_pred) == keras_pred) >= 0.99

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, img in enumerate(shapes(60, seed=2)[0]):
        cv2.imwrite(str(frames / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    r = CliRunner().invoke(cli, ["stream", "--model", str(tmp_path / "shapes.tflite"), "--images", str(frames),
                                 "--loop", "--frames", "400", "--noise", "relative", "--eta", "0.1",
                                 "--agreement-every", "4", "--quiet", "--log", str(tmp_path / "log.jsonl")])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])["summary"]
    assert summary["calibrated"] and summary["calibrated_at_frame"] <= 300 and summary["refolds"] >= 1
    assert summary["agreement_metric"] == "top1_agreement" and summary["agreement_samples"] >= 50
    assert 0 <= summary["agreement_before"] < 100  # the noise does cost this model agreement
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    named = [line["top"][0] for line in lines if "top" in line]
    assert len(named) == 400 and set(named) <= set(SHAPES)  # every frame's top class, by the --labels names

    val, val_truth = shapes(30, seed=3)
    for i, (img, c) in enumerate(zip(val, val_truth)):
        (tmp_path / "val" / SHAPES[c]).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "val" / SHAPES[c] / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    r = CliRunner().invoke(cli, ["evaluate", "classification", "--model", str(tmp_path / "shapes.tflite"),
                                 "--data", str(tmp_path / "val"), "--calib-dir", str(frames), "--center-crop", "1",
                                 "--noise", "relative:0,0.1", "--seeds", "0", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["images"] == 30
    clean = next(row for row in result["rows"] if row["eta"] == 0 and row["method"] == "original")
    keras_top1 = 100 * np.mean(np.argmax(model.predict(val.astype(np.float32), verbose=0), 1) == val_truth)
    assert abs(clean["top1_mean"] - keras_top1) <= 100 / 30 + 1e-9  # the converted model, as Keras, within one image
