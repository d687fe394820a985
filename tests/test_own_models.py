"""Bring your own model: a user's Keras model (any BatchNorm placement, nesting, preprocessing layers)
converts, refolds, calibrates and streams; what it needs is read from it; problems are one line."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

keras = pytest.importorskip("keras")

from edge_cbn.cli import main as cli  # noqa: E402
from edge_cbn.convert import own_model  # noqa: E402
from edge_cbn.convert.command import main as convert  # noqa: E402
from edge_cbn.convert.keras_fold import fold_plan  # noqa: E402
from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.runtime.device_calibration import DeviceCalibration  # noqa: E402
from edge_cbn.runtime.interpreter import io_indices, make_interpreter, run_interpreter  # noqa: E402
from edge_cbn.runtime.noise import make_noise  # noqa: E402
from edge_cbn.runtime.noisy_model import NoisyModel, noise_targets  # noqa: E402
from edge_cbn.runtime.refold import Refolder  # noqa: E402
from edge_cbn.runtime.stream_calibrator import StreamCalibrator  # noqa: E402
from own_models import backbone_in_sequential, bn_free, every_bn_kind, pixels  # noqa: E402

AFFINE = {"bn_in", "bn_add", "bn_act", "bn_shared", "bn_cat", "bn_pool", "bn_d"}


def tflite_outputs(model_bytes, x):
    it = make_interpreter(model_content=model_bytes)
    return run_interpreter(it, *io_indices(it), x)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-12))


def convert_own(model, path, **facts) -> Path:
    """What `convert --keras` does, with a model in memory."""
    return own_model.export_own_model(model, path, **facts)


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    model = every_bn_kind()
    return model, load_bundle(convert_own(model, tmp_path_factory.mktemp("own") / "every.tflite"))


def test_every_bn_placement_folds_or_becomes_an_affine(every_kind):
    model, bundle = every_kind
    plan = fold_plan(own_model._flat(model, "m"))
    kinds = {bn.name: kind for layer, kind, bn in plan if bn is not None}
    assert {bn for bn, kind in kinds.items() if kind == "affine"} == AFFINE
    assert kinds["bn_sep"] == "conv" and kinds["bn_t"] == "transpose"  # the separable's pointwise, the transposed conv
    records = {rec.name: rec for rec in bundle.layers}
    assert records["sep_depthwise"].kind == "depthwise" and records["sep"].bn == "bn_sep"
    assert {rec.bn for rec in bundle.layers if rec.kind == "affine"} == AFFINE
    assert bundle.meta["preprocess"]["std"] == pytest.approx([127.5] * 3)  # the Rescaling left the graph for the meta
    assert bundle.meta["preprocess"]["mean"] == pytest.approx([127.5] * 3)
    assert set(noise_targets(bundle)) == {r.name for r in bundle.layers if r.kind != "affine"}


def test_tflite_equals_keras(every_kind):
    model, bundle = every_kind
    x = pixels(1)
    got = tflite_outputs(bundle.model_bytes, x)[0]
    assert rel_err(got, model(x.astype(np.float32), training=False)) <= 1e-4


def new_stats(bundle, seed):
    rng = np.random.default_rng(seed)
    return {rec.bn: (rng.normal(0, 0.3, len(rec.mean)).astype(np.float32),
                     rng.uniform(0.5, 2.0, len(rec.var)).astype(np.float32)) for rec in bundle.layers if rec.bn}


def test_refold_with_new_statistics_equals_a_reconversion(every_kind, tmp_path):
    model, bundle = every_kind
    stats = new_stats(bundle, seed=4)
    refolder = Refolder(bundle)
    assert set(refolder.refold(stats)) == {rec.name for rec in bundle.layers if rec.bn}
    other = every_bn_kind()
    for bn, (mean, var) in stats.items():
        other.get_layer(bn).moving_mean.assign(mean)
        other.get_layer(bn).moving_variance.assign(var)
    again = load_bundle(convert_own(other, tmp_path / "again.tflite"))
    x = pixels(2)
    assert rel_err(tflite_outputs(refolder.model_bytes(), x)[0], tflite_outputs(again.model_bytes, x)[0]) <= 1e-5


def test_affine_bn_input_moments_are_recovered_at_batch_size_1(every_kind):
    model, bundle = every_kind
    variant = NoisyModel(bundle.calibration_variant())
    flat = own_model._flat(model, "m")
    bns = [flat.get_layer(name) for name in sorted(AFFINE)]
    probe = keras.Model(flat.inputs, [layer.input for layer in bns])
    x = pixels(3)
    got = StreamCalibrator(bundle).bn_input_moments(variant.run(x, 0)[-1], variant.stats())
    for layer, z in zip(bns, probe(x.astype(np.float32))):
        z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
        np.testing.assert_allclose(got[layer.name][0], z.mean(0), rtol=1e-4, atol=1e-4 * np.abs(z).max())
        np.testing.assert_allclose(got[layer.name][1], (z ** 2).mean(0), rtol=1e-4, atol=1e-4 * (z ** 2).max())


def test_calibration_under_noise_refolds_affine_and_folded_bns(every_kind):
    _, bundle = every_kind
    chip = make_noise("relative", 0.1, 0).instantiate(noise_targets(bundle))
    calibration = DeviceCalibration(bundle, chip)
    for i in range(40):
        calibration.step(pixels(10 + i), i)
    stats = calibration.noisy.stats()
    moved = {bn for bn, (mean, _) in stats.items()
             if not np.array_equal(mean, next(r.mean for r in bundle.layers if r.bn == bn))}
    # Every BN behind a noisy layer moves; the input's BN sees no noise, so its shift is exactly nothing.
    assert moved == {rec.bn for rec in bundle.layers if rec.bn} - {"bn_in"}


def test_nested_backbone_with_preprocessing_layers(tmp_path):
    model = backbone_in_sequential()
    bundle = load_bundle(convert_own(model, tmp_path / "t.tflite"))
    assert {"stem", "dw", "fc"} <= {rec.name for rec in bundle.layers}
    assert {rec.bn for rec in bundle.layers if rec.kind == "affine"} == set()  # all three BNs fold
    x = pixels(4)
    assert rel_err(tflite_outputs(bundle.model_bytes, x)[0], model(x.astype(np.float32))) <= 1e-4
    std = np.sqrt([0.052, 0.05, 0.051]) * 255  # Rescaling then Normalization, in pixel units
    assert bundle.meta["preprocess"]["std"] == pytest.approx(std.tolist(), rel=1e-6)
    assert bundle.meta["preprocess"]["mean"] == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255], rel=1e-6)


# ------------------------------------------------------------------------------------------------ the CLI
def run(command, args):
    return CliRunner().invoke(command, args, catch_exceptions=False)


def test_convert_keras_file_then_models_lists_it(tmp_path):
    path = tmp_path / "mine.keras"
    every_bn_kind().save(path)
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    r = run(convert, ["--keras", str(path), "--labels", str(tmp_path / "labels.txt"), "--noise-layers", "c_*,c1,Dense",
                      "-o", str(tmp_path / "mine.tflite")])
    assert r.exit_code == 0, r.output
    bundle = load_bundle(tmp_path / "mine.tflite")
    assert bundle.meta["labels"] == list("abcde") and bundle.meta["task"] == "classification"
    assert sorted(noise_targets(bundle)) == ["c1", "c_act", "c_shared", "d1", "head"]  # names, and Dense by class
    listing = run(cli, ["models", "--keras", str(path), "--noise-layers", "sep*"]).output
    assert "bn_add -> affine" in listing and "bn_sep -> folded into sep" in listing
    assert "noise targets: 2 layers (--noise-layers)" in listing and "  sep_depthwise" in listing


@pytest.mark.parametrize("flags, message", [
    (["--noise-layers", "nothing*"], "--noise-layers 'nothing*' matches no"),
    (["--task", "segmentation"], "--task segmentation needs one (N, H, W, classes) output"),
    (["--mean", "1,2"], "--mean: give one value or three"),
    (["--std", "1,x,3"], "--std '1,x,3': expected numbers"),
    (["--labels", "LABELS3"], "3 names for the model's 5 classes"),
    (["--weights", "LABELS3"], "--weights, --random-weights and --num-classes: for --model"),
])
def test_flag_problems_are_one_line(tmp_path, flags, message):
    path = tmp_path / "mine.keras"
    every_bn_kind().save(path)
    (tmp_path / "l3.txt").write_text("a\nb\nc\n")
    flags = [str(tmp_path / "l3.txt") if f == "LABELS3" else f for f in flags]
    r = run(convert, ["--keras", str(path), *flags, "-o", str(tmp_path / "m.tflite")])
    assert r.exit_code in (1, 2) and message in r.output and "Traceback" not in r.output


def test_files_keras_cannot_load_are_one_line(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    r = run(convert, ["--keras", str(bad), "-o", str(tmp_path / "m.tflite")])
    error = r.output.splitlines()[-1]
    assert r.exit_code == 1 and error.startswith("Error: ") and "bad.keras: Keras cannot load it:" in error
    (tmp_path / "saved").mkdir()
    r = run(convert, ["--keras", str(tmp_path / "saved"), "-o", str(tmp_path / "m.tflite")])
    assert r.exit_code == 1 and "SavedModel folder" in r.output


@keras.saving.register_keras_serializable("edge_cbn_tests")
class BesselLayer(keras.layers.Layer):
    """A layer whose op (BesselI1e) LiteRT's built-in ops lack."""

    def call(self, x):
        import tensorflow as tf

        return tf.math.bessel_i1e(x)


def test_a_layer_litert_cannot_run_is_named(tmp_path):
    inp = keras.Input((8, 8, 3))
    x = BesselLayer(name="odd_one")(keras.layers.Rescaling(1 / 255)(inp))
    path = tmp_path / "odd.keras"
    keras.Model(inp, keras.layers.Conv2D(2, 1)(x)).save(path)
    r = run(convert, ["--keras", str(path), "-o", str(tmp_path / "m.tflite")])
    assert r.exit_code == 1 and "layer 'odd_one' (BesselLayer) uses the TensorFlow op BesselI1e" in r.output


def test_unknown_preprocessing_asks_for_a_flag(tmp_path):
    inp = keras.Input((8, 8, 3))
    path = tmp_path / "plain.keras"
    keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Conv2D(2, 1)(inp)))).save(path)
    r = run(convert, ["--keras", str(path), "-o", str(tmp_path / "m.tflite")])
    assert r.exit_code == 1 and "--input-range" in r.output
    r = run(convert, ["--keras", str(path), "--input-range", "0", "1", "-o", str(tmp_path / "m.tflite")])
    assert r.exit_code == 0, r.output
    assert load_bundle(tmp_path / "m.tflite").meta["preprocess"]["std"] == [255.0] * 3


def test_a_model_without_batchnorm_converts_and_streams_with_a_notice(tmp_path):
    path = tmp_path / "nobn.keras"
    bn_free().save(path)
    r = CliRunner().invoke(convert, ["--keras", str(path), "-o", str(tmp_path / "nobn.tflite")])
    assert r.exit_code == 0 and "nothing to calibrate" in r.output
    r = CliRunner().invoke(cli, ["stream", "--model", str(tmp_path / "nobn.tflite"), "--noise", "relative",
                                 "--eta", "0.05", "--frames", "20", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "nothing to calibrate" in r.output
    summary = json.loads(r.output.strip().splitlines()[-1])["summary"]
    assert summary["frames"] == 20 and summary["calibrated"] is False


def test_raw_outputs_when_the_task_is_not_known(tmp_path):
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(6, 3, strides=2, name="c")(x))
    path = tmp_path / "feat.keras"
    keras.Model(inp, x).save(path)  # a (N, 7, 7, 6) feature map: no task edge-cbn knows
    r = run(convert, ["--keras", str(path), "-o", str(tmp_path / "feat.tflite")])
    assert r.exit_code == 0 and "task: raw" in r.output and "cosine similarity" in r.output
    assert load_bundle(tmp_path / "feat.tflite").meta["task"] == "raw"


def test_per_pixel_classes_read_as_segmentation_and_stream(tmp_path):
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(8, 3, padding="same", name="c")(x)))
    path = tmp_path / "seg.h5"  # the legacy HDF5 format loads too
    keras.Model(inp, keras.layers.Conv2D(4, 1, name="logits")(x)).save(path)
    r = run(convert, ["--keras", str(path), "-o", str(tmp_path / "seg.tflite")])
    assert r.exit_code == 0 and "task: segmentation" in r.output, r.output
    assert load_bundle(tmp_path / "seg.tflite").meta["labels"] == [f"class {i}" for i in range(4)]
    r = run(cli, ["stream", "--model", str(tmp_path / "seg.tflite"), "--noise", "relative", "--frames", "12", "--quiet"])
    assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["summary"]["frames"] == 12


def yolo_like(tmp_path) -> Path:
    """Two raw YOLO head maps (strides 16 and 8 on a 32x32 input, 3 anchors x (5 + 2 classes) each)."""
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.BatchNormalization(name="bn1")(keras.layers.Conv2D(8, 3, strides=8, padding="same", name="c1")(x))
    x = keras.layers.LeakyReLU(0.1)(x)
    fine = keras.layers.Conv2D(21, 1, name="head8")(x)
    y = keras.layers.BatchNormalization(name="bn2")(keras.layers.Conv2D(8, 3, strides=2, padding="same", name="c2")(x))
    coarse = keras.layers.Conv2D(21, 1, name="head16")(keras.layers.LeakyReLU(0.1)(y))
    path = tmp_path / "yolo.keras"
    keras.Model(inp, [coarse, fine]).save(path)
    return path


def test_a_detector_with_a_yolo_head_spec(tmp_path):
    path = yolo_like(tmp_path)
    head = {"anchors": [[4, 5], [6, 8], [9, 7], [10, 12], [14, 16], [20, 18]], "masks": [[3, 4, 5], [0, 1, 2]],
            "strides": [16, 8]}
    (tmp_path / "head.json").write_text(json.dumps(head))
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    r = run(convert, ["--keras", str(path), "-o", str(tmp_path / "d.tflite"), "--task", "detection"])
    assert r.exit_code == 1 and "--head FILE" in r.output
    r = run(convert, ["--keras", str(path), "-o", str(tmp_path / "d.tflite"), "--head", str(tmp_path / "head.json"),
                      "--labels", str(tmp_path / "labels.txt")])
    assert r.exit_code == 0 and "task: detection" in r.output, r.output
    bundle = load_bundle(tmp_path / "d.tflite")
    assert bundle.meta["head"] == head and bundle.meta["labels"] == ["cat", "dog"]
    r = run(cli, ["stream", "--model", str(tmp_path / "d.tflite"), "--noise", "relative", "--frames", "12", "--quiet"])
    assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["summary"]["frames"] == 12


def test_a_head_spec_that_does_not_fit_the_outputs_is_one_line(tmp_path):
    (tmp_path / "head.json").write_text(json.dumps({"anchors": [[4, 5]], "masks": [[0], [0]], "strides": [32, 8]}))
    r = run(convert, ["--keras", str(yolo_like(tmp_path)), "-o", str(tmp_path / "d.tflite"), "--head",
                      str(tmp_path / "head.json")])
    assert r.exit_code == 1 and "does not fit stride 32" in r.output and not (tmp_path / "d.tflite").exists()


def test_offline_calibration_of_an_own_model_under_noise_on_chosen_layers(tmp_path):
    import cv2

    path = tmp_path / "mine.keras"
    backbone_in_sequential().save(path)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        cv2.imwrite(str(images / f"{i}.png"), pixels(20 + i)[0])
    r = run(convert, ["--keras", str(path), "--calibrate", str(images), "--noise", "relative", "--eta", "0.1",
                      "--noise-layers", "stem", "--batch-size", "3", "-o", str(tmp_path / "cal.tflite")])
    assert r.exit_code == 0, r.output
    calibrated = {rec.bn: rec.mean for rec in load_bundle(tmp_path / "cal.tflite").layers if rec.bn}
    source = own_model._flat(backbone_in_sequential(), "m")
    for bn, mean in calibrated.items():  # re-estimated on the images: no longer the source statistics
        assert not np.allclose(mean, source.get_layer(bn).moving_mean.numpy())
    assert noise_targets(load_bundle(tmp_path / "cal.tflite")).keys() == {"stem"}


def test_a_free_input_size_and_input_layers_are_fixed_and_taken_out_in_one_rebuild(tmp_path):
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255, name="to_unit")(inp)
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, padding="same", name="c")(x))
    model = keras.Model(inp, keras.layers.Dense(3, name="fc")(keras.layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(own_model.OwnModelError, match="free .*--input-size"):
        own_model.describe(own_model._flat(model, "m"), name="m")
    own = own_model.describe(own_model._flat(model, "m"), name="m", input_size=24)
    assert own.model.input_shape == (None, 24, 24, 3) and "to_unit" not in [layer.name for layer in own.model.layers]
    assert own.preprocess["std"] == pytest.approx([255.0] * 3)
    bundle = load_bundle(convert_own(model, tmp_path / "free.tflite", input_size=24))
    x = pixels(5)[:, :24, :24]
    assert rel_err(tflite_outputs(bundle.model_bytes, x)[0], model(x.astype(np.float32))) <= 1e-4
