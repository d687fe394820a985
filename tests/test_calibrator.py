"""Streaming calibrator: BN-input moments recovered from the calibration variant, schedule, modes, state."""
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.runtime.device_calibration import DeviceCalibration  # noqa: E402
from edge_cbn.runtime.stream_calibrator import StreamCalibrator  # noqa: E402
from edge_cbn.runtime.noisy_model import NoisyModel, noise_targets  # noqa: E402
from edge_cbn.convert.export import export  # noqa: E402
from edge_cbn.runtime.noise import make_noise  # noqa: E402
from edge_cbn.runtime.processing import normalise  # noqa: E402
from tiny import PRE, SIZE, new_stats, pixels, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model(num_classes=4)
    path = export(model, tmp_path_factory.mktemp("cal") / "m.tflite", name="tiny", task="classification",
                  preprocess=PRE, labels=list("abcd"))
    return model, load_bundle(path)


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    # Frames share a per-frame offset so that between-frame variance is not negligible.
    return [pixels(rng.standard_normal((1, SIZE, SIZE, 3)) + rng.normal(0, 0.5, (1, 1, 1, 3)))
            for _ in range(n)]


def test_bn_input_moments_match_keras_under_any_folded_statistics(exported):
    model, bundle = exported
    stats = new_stats(bundle, seed=3)
    for layer in model.layers:  # the same statistics in Keras and in the refolded calibration variant
        if type(layer).__name__ == "BatchNormalization":
            layer.moving_mean.assign(stats[layer.name][0])
            layer.moving_variance.assign(stats[layer.name][1])
    variant = NoisyModel(bundle.calibration_variant())
    variant.set_stats(stats)
    cal = StreamCalibrator(bundle)
    bns = [l for l in model.layers if type(l).__name__ == "BatchNormalization"]
    probe = keras.Model(model.inputs, [l.input for l in bns])
    x = frames(1)[0]
    got = cal.bn_input_moments(variant.run(x, 0)[-1], variant.stats())
    assert set(got) == {l.name for l in bns}
    for layer, z in zip(bns, probe(normalise(x, PRE))):
        z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
        np.testing.assert_allclose(got[layer.name][0], z.mean(0), rtol=1e-4, atol=1e-4 * np.abs(z).max())
        np.testing.assert_allclose(got[layer.name][1], (z ** 2).mean(0), rtol=1e-4, atol=1e-4 * (z ** 2).max())
    # The source statistics' folding is computed once: the same moments as from a copy of them, bit for bit.
    vector = NoisyModel(bundle.calibration_variant()).run(x, 0)[-1]
    cached, fresh = cal.bn_input_moments(vector, cal.source), cal.bn_input_moments(vector, dict(cal.source))
    assert all(np.array_equal(cached[bn][k], fresh[bn][k]) for bn in cal.bns for k in (0, 1))


def drive(bundle, chip, xs, **options):
    """The stream's calibration step (DeviceCalibration, as stream and evaluate run it) over frames `xs`."""
    calibration = DeviceCalibration(bundle, chip, **options)
    refuses = sum(calibration.step(x, i)[1] is not None for i, x in enumerate(xs))
    clean = calibration.clean or NoisyModel(bundle.calibration_variant(), None)
    return calibration.calibrator, calibration.noisy, clean, refuses


def normalised(cal, model, xs):
    """Per-BN mean and variance of the normalised BN output over `xs`, pooled over frames."""
    acc = {}
    for i, x in enumerate(xs):
        for bn, (m, sq) in cal.bn_input_moments(model.run(x, i)[-1], model.stats()).items():
            acc.setdefault(bn, []).append((m, sq))
    out = {}
    for bn, ms in acc.items():
        m = np.mean([a for a, _ in ms], 0)
        var = np.mean([b for _, b in ms], 0) - m ** 2
        mean, v = model.stats()[bn]
        eps = cal._recs[bn].eps
        out[bn] = ((m - mean) / np.sqrt(v + eps), var / (v + eps))
    return out


def test_shift_mode_without_noise_keeps_the_source_statistics(exported):
    _, bundle = exported
    cal, noisy, _, refuses = drive(bundle, None, frames(12), refold_every=2, stages=3, track_every=2)
    assert refuses == 6 and cal.warm and cal.progress == 1.0
    for bn, (mean, var) in cal.statistics().items():
        np.testing.assert_allclose(mean, cal.source[bn][0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(var, cal.source[bn][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["shift", "absolute"])
def test_staged_calibration_aligns_every_layer_under_noise(exported, mode):
    """Under static relative noise, after staged calibration on a repeated frame set the noisy model's
    normalised BN outputs match the target: the clean model's (shift) or mean 0 / variance 1
    (absolute), in every layer — the Gauss-Seidel schedule reaches the fixed point."""
    _, bundle = exported
    chip = make_noise("relative", 0.3, seed=1, temporal=False).instantiate(noise_targets(bundle))
    xs = frames(6)
    n_bn = len(bundle.meta["calibration"]["bns"])
    cal, noisy, clean, _ = drive(bundle, chip, xs * (n_bn + 3), mode=mode, window=None, shrink=0,
                                 refold_every=len(xs), stages=n_bn, track_every=len(xs))
    got = normalised(cal, noisy, xs)
    before = normalised(cal, NoisyModel(bundle.calibration_variant(), chip), xs)
    target = normalised(cal, clean, xs) if mode == "shift" else None
    for bn in got:
        want_m, want_v = target[bn] if target else (0.0, 1.0)
        err = np.abs(got[bn][0] - want_m).max(), np.abs(got[bn][1] - want_v).max()
        err0 = np.abs(before[bn][0] - want_m).max(), np.abs(before[bn][1] - want_v).max()
        assert err[0] < 0.05 and err[1] < 0.05, (bn, err)
        assert err[0] < err0[0] or err0[0] < 0.05, (bn, err, err0)


def test_progress_and_state_round_trip(exported):
    _, bundle = exported
    chip = make_noise("relative", 0.1, seed=2).instantiate(noise_targets(bundle))
    cal, *_ = drive(bundle, chip, frames(5), refold_every=2, stages=3)
    assert not cal.warm and cal.stage == 2 and cal.progress == pytest.approx(5 / 6)
    again = StreamCalibrator(bundle, refold_every=2, stages=3)
    again.load_state_dict(dict(cal.state_dict()))
    assert again.stage == 2 and again.progress == cal.progress
    for bn, (m, v) in cal.statistics().items():
        np.testing.assert_array_equal(again.statistics()[bn][0], m)
        np.testing.assert_array_equal(again.statistics()[bn][1], v)
    with pytest.raises(ValueError, match="mode"):
        StreamCalibrator(bundle, mode="absolute").load_state_dict(cal.state_dict())


def test_prior_mode_weights_source_by_prior_strength(exported):
    _, bundle = exported
    xs = frames(4)
    absolute, *_ = drive(bundle, None, xs, mode="absolute", refold_every=4, stages=1)
    prior, *_ = drive(bundle, None, xs, mode="prior", prior=4.0, refold_every=4, stages=1)
    for bn, (m, v) in prior.statistics().items():
        np.testing.assert_allclose(m, 0.5 * absolute.source[bn][0] + 0.5 * absolute.statistics()[bn][0],
                                   rtol=1e-5, atol=1e-5)


def test_the_clean_calibration_variant_gives_the_models_outputs_bit_for_bit(exported):
    """What lets the stream's agreement sampling take the clean model's outputs from the clean variant
    it already runs (one model less in memory)."""
    _, bundle = exported
    model, variant = NoisyModel(bundle), NoisyModel(bundle.calibration_variant())
    for x in frames(3):
        want, got = model.run(x, 0), variant.run(x, 0)
        assert len(got) == len(want) + 1
        for a, b in zip(want, got[:-1]):
            np.testing.assert_array_equal(a, b)


def test_refolders_of_a_bundle_and_its_variant_share_one_read_only_kernel_copy(exported):
    from edge_cbn.runtime.refold import Refolder

    _, bundle = exported
    a, b = Refolder(bundle), Refolder(bundle.calibration_variant())
    for name, slot in a.layers.items():
        assert slot.kernel is b.layers[name].kernel and not slot.kernel.flags.writeable
