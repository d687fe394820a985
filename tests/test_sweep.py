"""The sweep variant: one invoke calibrates every BN layer of a frame, depth first, and gives what a
depth-first pass of one refold per layer gives on the same frame."""
import copy

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from edge_cbn.convert.export import export  # noqa: E402
from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.runtime.device_calibration import DeviceCalibration  # noqa: E402
from edge_cbn.runtime.errors import BadInput  # noqa: E402
from edge_cbn.runtime.moments import Moments  # noqa: E402
from edge_cbn.runtime.noise import make_noise  # noqa: E402
from edge_cbn.runtime.noisy_model import NoisyModel, noise_targets  # noqa: E402
from edge_cbn.runtime.stream_calibrator import SHRINK, SWEEP_SHRINK, StreamCalibrator  # noqa: E402
from tiny import PRE, SIZE, pixels, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = export(tiny_model(num_classes=4), tmp_path_factory.mktemp("sweep") / "m.tflite", name="tiny",
                  task="classification", preprocess=PRE, labels=list("abcd"))
    return load_bundle(path)


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [pixels(rng.standard_normal((1, SIZE, SIZE, 3)) + rng.normal(0, 0.5, (1, 1, 1, 3))) for _ in range(n)]


def depth_first_pass(bundle, chip, xs):
    """The reference: frame by frame, each BN layer measured through a refold and an invoke of the
    calibration variant under the layers before it already holding this frame's estimate.  Returns the
    statistics after each frame."""
    reference = StreamCalibrator(bundle, shrink=SWEEP_SHRINK)  # the sweep's pseudo-frames, one pass per layer
    noisy, clean = NoisyModel(bundle.calibration_variant(), chip), NoisyModel(bundle.calibration_variant())
    stats, after = dict(reference.statistics()), []
    for i, x in enumerate(xs):
        clean_moments = reference.bn_input_moments(clean.run(x, i)[-1], clean.stats())
        for bn in reference.bns:
            noisy.set_stats(stats)
            noisy_moments = reference.bn_input_moments(noisy.run(x, i)[-1], noisy.stats())
            reference.noisy[bn].update(*noisy_moments[bn])
            reference.clean[bn].update(*clean_moments[bn])
            stats[bn] = reference.estimate(bn)
        after.append(dict(stats))
    return after


def assert_close_statistics(got, want):
    for bn in want:
        for g, w in zip(got[bn], want[bn]):
            np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-3 * np.abs(w).max())


@pytest.mark.parametrize("window", [None, 2.0])  # 2: the EMA phase from the third frame on
def test_next_frame_gives_the_update_as_coefficients(window):
    rng = np.random.default_rng(0)
    acc = Moments(window)
    for _ in range(5):
        m, v = rng.normal(size=6), rng.uniform(0.5, 2, 6)
        share, spread, var_offset, mean = acc.next_frame()
        after = copy.deepcopy(acc)
        after.update(m, v + m**2)
        np.testing.assert_allclose(after.mean, mean + share * (m - mean), rtol=1e-12)
        np.testing.assert_allclose(after.var, var_offset + share * v + spread * (m - mean) ** 2, rtol=1e-10)
        acc = after


def test_the_exported_state_makes_the_sweep_the_calibration_variant(bundle):
    sweep, variant = NoisyModel(bundle.sweep_variant()), NoisyModel(bundle.calibration_variant())
    for x in frames(3):
        for got, want in zip(sweep.run(x), variant.run(x)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("noise", ["relative:0.3", "additive-max:0.05"])
def test_one_sweep_frame_is_a_depth_first_pass_of_one_refold_per_layer(bundle, noise):
    """Frame by frame, each BN layer measured under the layers before it already holding this frame's
    estimate: the sweep does it in one invoke, the reference with a refold and an invoke per layer."""
    kind, eta = noise.split(":")
    chip = make_noise(kind, float(eta), seed=1).instantiate(noise_targets(bundle))
    sweep = DeviceCalibration(bundle, chip, sweep=True, stages=2)
    swept = [sweep.step(x, i)[1] for i, x in enumerate(frames(4))]
    for got, want in zip(swept, depth_first_pass(bundle, chip, frames(4))):
        assert_close_statistics(got, want)
    assert sweep.calibrator.warm and sweep.calibrator.stage == 2
    # and not the source statistics: calibration moved them
    assert max(np.abs(m - sweep.calibrator.source[bn][0]).max() for bn, (m, _) in got.items()) > 1e-2


def test_the_sweep_has_pseudo_frames_of_its_own(bundle):
    """Depth first keeps SHRINK pseudo-frames of the source statistics; the sweep SWEEP_SHRINK, unless told."""
    assert StreamCalibrator(bundle).shrink == SHRINK and StreamCalibrator(bundle, sweep=True).shrink == SWEEP_SHRINK
    assert StreamCalibrator(bundle, sweep=True, shrink=2.5).shrink == 2.5


def test_the_sweep_is_refused_in_other_modes_and_without_its_file(bundle, tmp_path):
    with pytest.raises(ValueError, match="shift mode only"):
        StreamCalibrator(bundle, mode="absolute", sweep=True)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for p in bundle.path.parent.glob("m.*"):
        if not p.name.endswith(".sweep.tflite"):
            (copy_dir / p.name).write_bytes(p.read_bytes())
    partial = load_bundle(copy_dir / "m.tflite")
    assert partial.can_calibrate and not partial.can_sweep
    with pytest.raises(BadInput, match="no sweep variant"):
        partial.sweep_variant()
    (copy_dir / "m.sweep.tflite").write_bytes(bundle.calibration_variant().model_bytes)
    with pytest.raises(BadInput, match="sha256|sweep variant"):
        load_bundle(copy_dir / "m.tflite").sweep_variant()


def test_a_saved_sweep_state_resumes_to_the_same_statistics(bundle):
    chip = make_noise("relative", 0.2, seed=2).instantiate(noise_targets(bundle))
    xs = frames(5, seed=3)
    whole = DeviceCalibration(bundle, chip, sweep=True, stages=3)
    for i, x in enumerate(xs):
        whole.step(x, i)
    first = DeviceCalibration(bundle, chip, sweep=True, stages=3)
    for i, x in enumerate(xs[:2]):
        first.step(x, i)
    resumed = DeviceCalibration(bundle, chip, sweep=True, stages=3)
    resumed.calibrator.load_state_dict(first.calibrator.state_dict())
    for i, x in enumerate(xs[2:], start=2):
        resumed.step(x, i)
    for bn, (mean, var) in whole.statistics().items():
        np.testing.assert_array_equal(resumed.statistics()[bn][0], mean)
        np.testing.assert_array_equal(resumed.statistics()[bn][1], var)
    assert resumed.calibrator.warm and not first.calibrator.warm


@pytest.mark.parametrize("noise", [None, "static"])
def test_the_sweep_writes_its_state_without_temporal_noise_too(bundle, noise):
    """A clean or static chip builds no new model per frame for serving, but the sweep's state changes at
    every frame: its step still equals the sweep under a chip whose every frame is the same."""
    chip = None if noise is None else make_noise("relative", 0.3, seed=1, temporal=False).instantiate(
        noise_targets(bundle))
    sweep = DeviceCalibration(bundle, chip, sweep=True, stages=2)
    stats = [sweep.step(x, i)[1] for i, x in enumerate(frames(3))]
    moved = max(np.abs(m - sweep.calibrator.source[bn][0]).max() for bn, (m, _) in stats[-1].items())
    if noise is None:  # clean: nothing to correct, every estimate stays at the source statistics
        assert moved < 1e-3
    else:
        assert moved > 1e-2
        assert_close_statistics(stats[-1], depth_first_pass(bundle, chip, frames(3))[-1])


def test_the_stream_without_a_sweep_file_calibrates_depth_first_and_a_damaged_one_is_one_line(bundle, tmp_path):
    from click.testing import CliRunner
    from edge_cbn.cli import main

    for p in bundle.path.parent.glob("m.*"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    sweep_file = tmp_path / "m.sweep.tflite"
    args = ["stream", "--model", str(tmp_path / "m.tflite"), "--frames", "3", "--headless", "--quiet",
            "--noise", "relative"]
    data = bytearray(sweep_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    sweep_file.write_bytes(bytes(data))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "m.sweep.tflite" in r.output, r.output
    sweep_file.unlink()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "no sweep variant" in r.output and "calibrating depth first" in r.output, r.output
    r = CliRunner().invoke(main, [*args, "--sweep"])
    assert r.exit_code == 1 and "--sweep:" in r.output and "m.sweep.tflite" in r.output, r.output
