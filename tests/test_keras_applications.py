"""keras.applications architectures as users bring them (`convert --model keras.applications.NAME --weights
FILE`): with random weights and randomised BN statistics at a small input size, the exported TFLite equals
the Keras model behind its own `preprocess_input`, and a refold with new statistics equals the Keras model
holding them.  Two run in CI (one whose BNs all fold, one with BNs after Add); the whole list is
`pytest -m applications` (docs/BENCHMARKS.md)."""
import importlib

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from edge_cbn.convert import own_model  # noqa: E402
from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.runtime.interpreter import io_indices, make_interpreter, run_interpreter  # noqa: E402
from edge_cbn.runtime.refold import Refolder  # noqa: E402
from own_models import randomise  # noqa: E402

CI = ["MobileNetV3Small", "ResNet50V2"]
REST = ["MobileNet", "MobileNetV2", "MobileNetV3Large", "EfficientNetB0", "EfficientNetV2B0", "ResNet50", "DenseNet121",
        "InceptionV3", "Xception", "NASNetMobile", "InceptionResNetV2", "ResNet101V2"]
SIDE = {"InceptionV3": 96, "Xception": 96, "InceptionResNetV2": 96}  # their smallest inputs are 75 and 71


def tflite(model_bytes, x):
    it = make_interpreter(model_content=model_bytes)
    return run_interpreter(it, *io_indices(it), x)[0]


def rel_err(a, b) -> float:
    b = np.asarray(b)
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def check(name, tmp_path):
    side = SIDE.get(name, 64)
    builder = getattr(keras.applications, name)
    keras.utils.set_random_seed(0)  # the same weights, so the same errors, at every run
    original = builder(weights=None, input_shape=(side, side, 3), classes=7)
    randomise(original, seed=3)
    weights = tmp_path / f"{name}.weights.h5"
    original.save_weights(weights)  # stands in for the file Keras publishes
    model, known = own_model.keras_application(f"keras.applications.{name}", weights=weights, input_size=side,
                                               num_classes=7)
    # Only the model and its refold are checked here: its calibration variants are the other tests' business.
    bundle = load_bundle(own_model.export_own_model(model, tmp_path / f"{name}.tflite", name=name, preprocess=known,
                                                    calibration=False))
    preprocess_input = importlib.import_module(builder.__module__).preprocess_input
    x = np.random.default_rng(0).integers(0, 256, (1, side, side, 3)).astype(np.uint8)

    def keras_output():
        return original(preprocess_input(x.astype(np.float32)), training=False)
    exported_err = rel_err(tflite(bundle.model_bytes, x), keras_output())
    assert exported_err <= 1e-4

    rng = np.random.default_rng(5)
    stats = {rec.bn: (rec.mean + rng.normal(0, 0.1, rec.mean.shape).astype(np.float32),
                      rec.var * rng.uniform(0.8, 1.25, rec.var.shape).astype(np.float32))
             for rec in bundle.layers if rec.bn}
    refolder = Refolder(bundle)
    refolder.refold(stats)
    # The original's BN of each record: by its (random, so unique) statistics, since Keras numbers unnamed
    # layers anew in each model it builds.
    by_mean = {np.asarray(layer.moving_mean).tobytes(): layer for layer in original.layers
               if isinstance(layer, keras.layers.BatchNormalization)}
    for rec in bundle.layers:
        if rec.bn:
            by_mean[rec.mean.tobytes()].moving_mean.assign(stats[rec.bn][0])
            by_mean[rec.mean.tobytes()].moving_variance.assign(stats[rec.bn][1])
    refolded_err = rel_err(tflite(refolder.model_bytes(), x), keras_output())
    assert refolded_err <= 1e-4
    bns = [rec for rec in bundle.layers if rec.bn]
    print(f"\n{name} {side}px: {len(bns)} BN ({sum(rec.kind == 'affine' for rec in bns)} as affines), "
          f"{len(bundle.layers)} layers; TFLite vs Keras {exported_err:.1e}, refolded {refolded_err:.1e}")
    return bundle


@pytest.mark.slow
@pytest.mark.parametrize("name", CI)
def test_in_ci(name, tmp_path):
    bundle = check(name, tmp_path)
    kinds = {rec.kind for rec in bundle.layers}
    assert ("affine" in kinds) == (name == "ResNet50V2")  # pre-activation: BN after the Add


@pytest.mark.applications
@pytest.mark.parametrize("name", REST)
def test_every_other_architecture(name, tmp_path):
    check(name, tmp_path)
