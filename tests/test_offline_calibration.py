"""Offline Algorithm 1 (Keras) and the noise source applied identically in the Keras and TFLite paths."""
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.convert.offline_calibration import bn_layers, calibrate_bn, keras_noise_targets, set_kernels  # noqa: E402
from edge_cbn.runtime.noisy_model import NoisyModel, noise_targets  # noqa: E402
from edge_cbn.convert.export import export  # noqa: E402
from edge_cbn.runtime.noise import PRESETS, make_noise  # noqa: E402
from edge_cbn.runtime.processing import normalise  # noqa: E402
from edge_cbn.lab.bench.calibrate import float64_statistics  # noqa: E402
from edge_cbn.lab.bench.statistics import relative_difference  # noqa: E402
from tiny import PRE, SIZE, pixels, tiny_model  # noqa: E402


def batches(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((size, SIZE, SIZE, 3)).astype(np.float32) for _ in range(n)]


def test_cumulative_estimator_equals_train_mode_batch_statistics():
    model = tiny_model()
    (batch,) = batches(1, 16)
    bns = bn_layers(model)
    probe = keras.Model(model.inputs, [l.input for l in bns])
    acts = probe(batch, training=True)  # BN normalises with batch statistics, as torch train mode
    stats = calibrate_bn(model, [batch], estimator="cumulative")
    for layer, a in zip(bns, acts):
        a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
        np.testing.assert_allclose(stats[layer.name][0], a.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[layer.name][1], a.var(0, ddof=1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.moving_mean.numpy(), a.mean(0), rtol=1e-4, atol=1e-5)


def test_ema_estimator_is_algorithm_1_from_the_source_statistics():
    model = tiny_model()
    bn = bn_layers(model)[0]
    src_mean = bn.moving_mean.numpy().copy()
    data = batches(3, 4)
    ema = calibrate_bn(model, data, estimator="ema", momentum=0.9)[bn.name][0]
    cum_model = tiny_model()
    means = []
    for b in data:  # one batch at a time: the cumulative estimator over a single batch = its mean
        means.append(calibrate_bn(cum_model, [b], estimator="cumulative")[bn.name][0])
        cum_model = tiny_model()
    want = src_mean
    for m in means:  # only the first BN's batch means do not depend on earlier updates
        want = 0.9 * want + 0.1 * m
    np.testing.assert_allclose(ema, want, rtol=1e-4, atol=1e-5)


def test_calibration_under_noise_restores_clean_kernels_and_is_seeded():
    model = tiny_model()
    clean = {n: k.copy() for n, (_, k) in keras_noise_targets(model).items()}
    chip = make_noise("relative", 0.2, seed=4).instantiate(keras_noise_targets(model))
    a = calibrate_bn(model, batches(2, 4), chip=chip, estimator="cumulative")
    for name, k in keras_noise_targets(model).items():
        np.testing.assert_array_equal(k[1], clean[name])
    model2 = tiny_model()
    b = calibrate_bn(model2, batches(2, 4), chip=make_noise("relative", 0.2, seed=4).instantiate(
        keras_noise_targets(model2)), estimator="cumulative")
    c = calibrate_bn(tiny_model(), batches(2, 4), estimator="cumulative")
    bn = next(iter(a))
    np.testing.assert_allclose(a[bn][0], b[bn][0], rtol=1e-6)
    assert not np.allclose(a[bn][1], c[bn][1], rtol=1e-3)
    # a second chip on the same model reuses its traced graphs (the kernels are assigned in place), with
    # the statistics a model traced afresh gives
    from edge_cbn.convert.batch_moments import batch_moments_of
    traced = batch_moments_of(model, bn_layers(model))
    for layer in bn_layers(model):
        layer.moving_mean.assign(np.zeros_like(layer.moving_mean))
        layer.moving_variance.assign(np.ones_like(layer.moving_variance))
    again = calibrate_bn(model, batches(2, 4), chip=make_noise("relative", 0.2, seed=5).instantiate(
        keras_noise_targets(model)), estimator="cumulative")
    assert batch_moments_of(model, bn_layers(model)) is traced
    fresh = calibrate_bn(tiny_model(), batches(2, 4), chip=make_noise("relative", 0.2, seed=5).instantiate(
        keras_noise_targets(tiny_model())), estimator="cumulative")
    np.testing.assert_allclose(again[bn][1], fresh[bn][1], rtol=1e-5)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_same_seed_same_noisy_outputs_in_keras_and_tflite(tmp_path, preset):
    model = tiny_model(num_classes=6, seed=3)
    path = export(model, tmp_path / "m.tflite", name="tiny", task="classification", preprocess=PRE,
                  labels=list("abcdef"), calibration=False)
    bundle = load_bundle(path)
    eta = 1.0 if preset == "pcm" else 0.1
    rgb = pixels(np.random.default_rng(1).standard_normal((1, SIZE, SIZE, 3)))
    x = normalise(rgb, PRE)
    tflite = NoisyModel(bundle, make_noise(preset, eta, seed=7).instantiate(noise_targets(bundle)))
    chip = make_noise(preset, eta, seed=7).instantiate(keras_noise_targets(model))
    for frame in (0, 5):
        set_kernels(model, chip.perturb(frame))
        want = np.asarray(model(x, training=False))
        got = tflite.run(rgb, frame)[0]
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))
    clean = NoisyModel(bundle).run(rgb, 0)[0]
    assert np.abs(got - clean).max() > 1e-3  # the noise did something


def assert_close_statistics(got, want, rtol=1e-5):
    assert relative_difference(got, want) <= rtol


def test_in_graph_reduction_equals_float64_activations():
    """Only (mean, M2) per channel leave TensorFlow; the statistics equal the float64 reduction of the
    whole activations to 1e-5."""
    model = tiny_model()
    (batch,) = batches(1, 32, seed=5)
    want = float64_statistics(model, batch)
    assert_close_statistics(calibrate_bn(model, [batch], estimator="cumulative"), want)


@pytest.mark.parametrize("estimator", ["cumulative", "ema"])
def test_micro_batches_equal_the_whole_batch(estimator):
    """A batch run in micro-batches gives the statistics of the whole batch at once (each BN normalises
    with the whole batch's statistics), with the same noise draw, for both estimators."""
    data = batches(2, 24, seed=6)

    def run(micro):
        model = tiny_model()
        chip = make_noise("relative", 0.1, seed=2).instantiate(keras_noise_targets(model))
        return calibrate_bn(model, data, chip=chip, estimator=estimator, momentum=0.5, micro_batch=micro)

    whole = run(None)
    assert_close_statistics(run(5), whole)
    if estimator == "ema":
        return
    # Averaging micro-batches that each normalise on their own is not the same thing (the test can fail).
    model = tiny_model()
    ghost = calibrate_bn(model, [b[i:i + 6] for b in data for i in range(0, 24, 6)], estimator=estimator,
                         chip=make_noise("relative", 0.1, seed=2).instantiate(keras_noise_targets(model)),
                         momentum=0.5)
    with pytest.raises(AssertionError):
        assert_close_statistics(ghost, whole)


def test_prefetched_keeps_order_and_raises_the_producers_error():
    from edge_cbn.convert.offline_calibration import prefetched

    assert list(prefetched(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise OSError("cannot read image x.jpg")

    got = []
    with pytest.raises(OSError, match="x.jpg"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1]


def test_layer_names_starting_with_an_underscore():
    """EfficientNet-Lite's layers are named `_conv_stem`, `_bn0`, …: TensorFlow refuses such names as root
    name scopes, so the in-graph reduction must run inside a scope of its own."""
    from edge_cbn.convert.tf_import import keras

    x = inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="_conv_stem")(x)
    x = keras.layers.BatchNormalization(name="_bn0")(x)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="_pool")(x))
    stats = calibrate_bn(model, [np.random.default_rng(0).random((4, 8, 8, 3), np.float32)], estimator="cumulative")
    assert set(stats) == {"_bn0"} and np.isfinite(stats["_bn0"][1]).all()
