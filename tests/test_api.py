"""docs/API.md's example runs as written, and the package exports what that page lists."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import edge_cbn

API_DOC = Path(__file__).parents[1] / "docs" / "API.md"


def test_the_package_exports_the_documented_entry_points():
    names = set(re.findall(r"^\| `(\w+)", API_DOC.read_text(), re.M))
    assert {"CalibratedModel", "load_bundle", "NoisyModel", "DeviceCalibration", "Refolder", "export",
            "calibrate_bn"} <= names
    for name in names | {"make_noise", "noise_targets", "StreamLoop", "StreamOptions"}:
        assert callable(getattr(edge_cbn, name)), name
    with pytest.raises(AttributeError):
        edge_cbn.no_such_thing


def test_editors_resolve_what_the_package_imports_on_first_use():
    """The TYPE_CHECKING block names exactly the lazily imported entry points, from the same modules."""
    tree = ast.parse(Path(edge_cbn.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    typed = {alias.name: "edge_cbn." + node.module for node in block.body for alias in node.names}
    assert typed == edge_cbn._API


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from tiny import PRE, tiny_model

    from edge_cbn.convert.export import export

    folder = tmp_path_factory.mktemp("api")
    path = export(tiny_model(num_classes=4), folder / "m.tflite", name="m", task="classification",
                  preprocess=PRE, labels=list("abcd"))
    frames = folder / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(frames / f"{i:03d}.jpg"), rng.integers(0, 256, (48, 64, 3), np.uint8))
    return path, frames


def test_the_api_example_calibrates_a_folder_of_frames(exported, tmp_path):
    path, frames = exported
    code = re.search(r"```python\n(.*?)```", API_DOC.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 8
    (tmp_path / "calibrate_folder.py").write_text(code)
    out = subprocess.run([sys.executable, "calibrate_folder.py", str(path), str(frames)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    top = eval(out.strip().splitlines()[-1])  # [(class_id, label, probability), ...] best first
    assert [label for _, label, _ in top] and all(label in "abcd" for _, label, _ in top)
    assert 0 < top[0][2] <= 1
    saved = edge_cbn.load_bundle(tmp_path / "calibrated.tflite")
    assert saved.meta["calibrated"]["noise"] == "relative:0.05"


def test_the_task_object_calibrates_as_the_pieces_do_and_saves_what_it_serves(exported, tmp_path):
    from edge_cbn import CalibratedModel, DeviceCalibration, NoisyModel, Processor, Relative

    path, folder = exported
    frames = [cv2.imread(str(p)) for p in sorted(folder.glob("*.jpg"))]
    model = CalibratedModel.from_file(path, noise=Relative(eta=0.2), seed=3)
    before = model.predict(frames[0], index=100)
    stats = model.calibrate(frames)
    assert model.calibrated
    # The same as the pieces wired by hand: DeviceCalibration (the sweep, the default for a model with a sweep
    # variant, its warm-up of 8 frames) on the frames as inferences 101..108 (the ones after the
    # prediction's), the statistics refolded.
    bundle = edge_cbn.load_bundle(path)
    chip = Relative(eta=0.2).chip(bundle, seed=3)
    proc = Processor(bundle, max_results=3)
    by_hand = DeviceCalibration(bundle, chip, sweep=True, stages=8).calibrate([proc.preprocess(f)[0].copy() for f in frames], frame0=101)
    assert stats.keys() == by_hand.keys()
    for bn in stats:
        np.testing.assert_array_equal(stats[bn][0], by_hand[bn][0])
        np.testing.assert_array_equal(stats[bn][1], by_hand[bn][1])
    served = NoisyModel(bundle, chip, noise_states=3, seed=3)
    served.set_stats(by_hand)
    x, ctx = proc.preprocess(frames[1])
    assert model.predict(frames[1], index=100) == proc.postprocess(served.run(x, 100), ctx) != before
    # Saved, it serves the calibrated statistics under the same chip, prediction for prediction.
    again = CalibratedModel.from_file(model.save(tmp_path / "cal.tflite"), noise=Relative(eta=0.2), seed=3)
    assert not again.calibrated
    for i, frame in enumerate(frames):
        assert again.predict(frame, index=i) == model.predict(frame, index=i)


def test_stream_mode_calibrates_by_frame_index_as_the_stream_does(exported):
    from edge_cbn import CalibratedModel, CalibrationOptions, Engine, Relative

    path, folder = exported
    frames = [cv2.imread(str(p)) for p in sorted(folder.glob("*.jpg"))] * 4
    model = CalibratedModel.from_file(path, noise=Relative(eta=0.2), calibration=CalibrationOptions(calibrate_every=1))
    engine = Engine(model.bundle, model.options.stream_options(), background=False)
    for i, frame in enumerate(frames):
        mine, streams = model.process(frame, i), engine.process(frame, i)
        assert (mine.prediction, mine.calibrating, mine.refolded) == (
            streams.prediction, streams.calibrating, streams.refolded)
    assert model.calibrated and model.engine.refolds > 0
    with pytest.raises(ValueError, match="no frames"):
        model.calibrate([])
    with pytest.raises(ValueError, match="nothing to calibrate"):
        CalibratedModel.from_file(path).calibrate(frames)


def test_the_noise_classes_are_the_presets_bit_for_bit(exported):
    from edge_cbn import PCM, AdditiveMax, Paper, Relative, make_noise, noise_model, noise_targets

    bundle = edge_cbn.load_bundle(exported[0])
    for model in (Paper(eta=0.3, t_granularity="weight"), Relative(eta=0.05), AdditiveMax(eta=0.02), PCM(eta=1.0)):
        assert noise_model(model.preset, model.eta, **model.options()) == model
        mine = model.chip(bundle, seed=7)
        preset = make_noise(model.preset, model.eta, 7, **model.options()).instantiate(noise_targets(bundle))
        for name, layer in mine.layers.items():
            np.testing.assert_array_equal(layer.base, preset.layers[name].base)
            np.testing.assert_array_equal(mine.xi(name, 5), preset.xi(name, 5))
    assert noise_model("none", 0.0) is None
    with pytest.raises(ValueError, match="unknown option"):
        noise_model("relative", 0.05, g_max=3.0)
    with pytest.raises(ValueError, match="eta"):
        Relative(eta=float("nan")).noise()


def test_the_own_model_example_exports_calibrates_and_predicts(tmp_path):
    pytest.importorskip("tensorflow")
    from own_models import every_bn_kind

    text = API_DOC.read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Your own Keras model"):], re.S).group(1)
    assert len(code.strip().splitlines()) <= 8
    (tmp_path / "own_model.py").write_text(code)
    every_bn_kind().save(tmp_path / "mine.keras")
    rng = np.random.default_rng(1)
    frames = [str(tmp_path / f"{i}.jpg") for i in range(6)]
    for f in frames:
        cv2.imwrite(f, rng.integers(0, 256, (40, 56, 3), np.uint8))
    out = subprocess.run([sys.executable, "own_model.py", "mine.keras", "a,b,c,d,e", *frames], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    top = eval(out.strip().splitlines()[-1])
    assert top[0][1] in "abcde" and (tmp_path / "mine.cbn.npz").exists() and (tmp_path / "mine.calib.tflite").exists()
