"""`edge-cbn divergence` (the paper's Fig. 1): the histogram KL/JS estimator against closed forms, and the
command end to end on a tiny exported model."""
import csv
import json
import math

import numpy as np
import pytest

from edge_cbn.lab.divergence import (CSV_FIELDS, ChannelBins, bootstrap_spread, channel_histograms, divergences,
                                     image_groups, js_divergence,
                                     kl_divergence, smoothed)


def test_histograms_put_the_clean_range_in_the_inner_bins_and_the_rest_in_the_open_ones():
    bins = ChannelBins(np.array([0.0, 5.0]), np.array([4.0, 5.0]), 4)  # channel 1 is constant
    z = np.array([[0.0, 5.0], [0.99, 5.0], [1.0, 4.0], [4.0, 6.0], [-0.1, np.nan], [7.0, 5.0]], np.float32)
    h = channel_histograms(z, bins, np.zeros(z.shape, bool))
    assert h.tolist() == [[1, 2, 1, 0, 1, 1, 0], [1, 3, 0, 0, 0, 2, 0]]  # max: last inner bin; NaN: above
    # exact zeros are an atom of their own (the last column), wherever a normalisation put them
    assert channel_histograms(z, bins)[0].tolist() == [1, 1, 1, 0, 1, 1, 1]
    moved = channel_histograms(z - 0.5, bins, zero=z == 0)  # the point mass shifted below the range: still the atom
    assert moved[0, -1] == 1 and moved[0, 0] == 1


def test_a_point_mass_moved_by_new_statistics_costs_no_divergence():
    """A channel of which 80 % is exactly zero before normalisation: statistics that move the normalised
    point mass off the first bin's edge by a hair leave the atom where it is, and the KL near zero."""
    rng = np.random.default_rng(0)
    z = np.where(rng.random((20_000, 1)) < 0.8, 0.0, rng.gamma(2.0, 1.0, (20_000, 1)))
    clean_stats, moved_stats = (z.mean(0), z.var(0)), (z.mean(0) * 1.001, z.var(0))
    clean, moved = (z - clean_stats[0]) / np.sqrt(clean_stats[1]), (z - moved_stats[0]) / np.sqrt(moved_stats[1])
    bins = ChannelBins(clean.min(0), clean.max(0), 64)
    with_atom = divergences(channel_histograms(clean, bins, z == 0), channel_histograms(moved, bins, z == 0), 1e-6)[0]
    without = divergences(channel_histograms(clean, bins, np.zeros(z.shape, bool)),
                          channel_histograms(moved, bins, np.zeros(z.shape, bool)), 1e-6)[0]
    assert with_atom < 0.01 < 1 < without


def test_kl_and_js_of_hand_computed_histograms():
    p, q = np.array([[0.5, 0.5]]), np.array([[0.25, 0.75]])
    assert kl_divergence(p, q)[0] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    m = np.array([0.375, 0.625])
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
        0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert js_divergence(p, q)[0] == pytest.approx(js)
    assert js_divergence(q, p)[0] == pytest.approx(js)  # symmetric
    disjoint = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert js_divergence(*disjoint)[0] == pytest.approx(math.log(2))  # the bound, reached
    assert kl_divergence(p, p)[0] == 0 and divergences(np.array([[3, 0, 5]]), np.array([[3, 0, 5]]), 1e-6) == (0, 0)


def test_smoothing_keeps_probabilities_and_bounds_kl():
    counts = np.array([[4, 0, 0, 0], [1, 1, 1, 1]])
    p = smoothed(counts, 1e-3)
    assert np.allclose(p.sum(axis=1), 1) and (p > 0).all()
    e = 1e-3
    kl, js = divergences(counts[:1], counts[1:], e)  # one channel each
    p0, q0 = (1 + e) / (1 + 4 * e), (0.25 + e) / (1 + 4 * e)
    pe = e / (1 + 4 * e)
    assert kl == pytest.approx(p0 * math.log(p0 / q0) + 3 * pe * math.log(pe / q0))  # -> ln 4 as e -> 0
    assert divergences(counts[:1], counts[1:], 1e-12)[0] == pytest.approx(math.log(4))
    assert 0 < js <= math.log(2)


def test_kl_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    clean = rng.normal(0.0, 1.0, (200_000, 1))
    noisy = rng.normal(0.3, 1.2, (200_000, 1))
    bins = ChannelBins(clean.min(axis=0), clean.max(axis=0), 128)
    kl, js = divergences(channel_histograms(clean, bins), channel_histograms(noisy, bins), 1e-6)
    closed = math.log(1.2) + (1 + 0.3 ** 2) / (2 * 1.2 ** 2) - 0.5  # KL(N(0,1) ‖ N(0.3, 1.2²))
    assert kl == pytest.approx(closed, rel=0.1)
    assert 0 < js < kl and js <= math.log(2)
    same, _ = divergences(channel_histograms(clean, bins), channel_histograms(clean, bins), 1e-6)
    assert same == 0


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    pytest.importorskip("keras")
    pytest.importorskip("skimage")
    from edge_cbn.convert.export import export
    from tiny import PRE, tiny_model

    return export(tiny_model(num_classes=4), tmp_path_factory.mktemp("div") / "m.tflite", name="tiny",
                  task="classification", preprocess=PRE, labels=list("abcd"))


def test_divergence_end_to_end(model_path, tmp_path, monkeypatch):
    """`paper` at η0 0.5 rescales every weight by about 1.25, which moves the statistics of every BN input
    and which calibrated statistics undo: calibration lowers the divergence of every layer after the first,
    whose input (no BN before it) is the same either way."""
    from click.testing import CliRunner

    import edge_cbn.convert.models as zoo
    from edge_cbn.lab.divergence import main
    from tiny import tiny_model

    # The tiny model is not registered: its architecture stands in; the weights come from the bundle.
    monkeypatch.setattr(zoo, "build", lambda name, **kw: tiny_model(num_classes=4, seed=9))
    res = CliRunner().invoke(main, ["--model", str(model_path), "--noise", "paper", "--eta", "0.5", "--limit", "16",
                                    "--cal-frames", "48", "--batch-size", "8", "--num-threads", "1",
                                    "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["images"] == 16 and out["cal_frames"] == 48 and out["layers"] == 5
    with open(out["files"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS and [r["layer"] for r in rows] == [r["layer"] for r in out["rows"]]
    assert rows[0]["layer"] == "stem.bn" and rows[0]["kl_uncal"] == rows[0]["kl_cal"]
    later = out["rows"][1:]
    assert all(r["kl_cal"] < r["kl_uncal"] and r["js_cal"] < r["js_uncal"] for r in later)
    # uncalibrated, the shift compounds with depth; calibrated, each input keeps only its own conv's
    assert later[-1]["kl_uncal"] > later[0]["kl_uncal"] and later[-1]["ratio"] > 2
    assert out["mean"]["kl_cal"] < out["mean"]["kl_uncal"]
    assert all(0 <= r[k] <= math.log(2) for r in out["rows"] for k in ("js_uncal", "js_cal"))
    assert "KL(clean‖noisy)" in res.output
    # The outputs, normalised with the statistics in force: calibration brings every layer's close to the
    # clean one, the first layer's too (its own statistics act there), and far closer than its input.
    assert all(r["kl_cal_out"] < r["kl_uncal_out"] for r in out["rows"])
    assert out["mean"]["kl_cal_out"] < out["mean"]["kl_cal"] and out["ratio_of_means_out"] > out["ratio_of_means"]
    assert "BN outputs (normalised, the paper's Fig. 1)" in res.output
    kinds = out["outputs_by_kind"]  # per kind of layer the BN folds into, from the sidecar
    assert set(kinds) <= {"conv", "depthwise", "dense"} and sum(k["layers"] for k in kinds.values()) == 5
    assert {r["after"] for r in rows} == set(kinds)
    # 16 images in 2 groups: the spread over image samples is measured and printed, per layer
    assert all(r["kl_uncal_spread"] >= 0 for r in out["rows"]) and out["median_spread"]["kl_cal_spread"] >= 0
    assert "spread over image samples" in res.output
    if "png" in out["files"]:
        assert open(out["files"]["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_keras_model_is_the_bundle(model_path, monkeypatch):
    """The activations come from the registered architecture filled with the bundle's own tensors: it
    computes what the exported model computes (here from an architecture built with other weights)."""
    import edge_cbn.convert.models as zoo
    from edge_cbn.lab.divergence import keras_batches, keras_model_of
    from edge_cbn.runtime.bundle import load_bundle
    from edge_cbn.runtime.noisy_model import NoisyModel
    from tiny import SIZE, tiny_model

    monkeypatch.setattr(zoo, "build", lambda name, **kw: tiny_model(num_classes=4, seed=9))
    bundle = load_bundle(model_path)
    x = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), np.uint8)
    keras_out = np.asarray(keras_model_of(bundle)(next(keras_batches(bundle, x, 3)), training=False))
    lite_out = np.concatenate([NoisyModel(bundle).run(xi[None])[0] for xi in x])
    assert np.allclose(keras_out, lite_out, atol=1e-4 * np.abs(lite_out).max())


def test_image_folders_and_calibration_never_on_evaluation_images(model_path, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import edge_cbn.convert.models as zoo
    from edge_cbn.lab.divergence import main
    from edge_cbn.runtime.errors import BadInput
    from labelled_tiny import write_image
    from tiny import tiny_model

    monkeypatch.setattr(zoo, "build", lambda name, **kw: tiny_model(num_classes=4))
    rng = np.random.default_rng(0)
    for i in range(5):
        write_image(tmp_path / "eval" / f"e{i}.png", (24, 30), rng)
        write_image(tmp_path / "cal" / f"c{i}.png", (20, 20), rng)
    args = ["--model", str(model_path), "--cal-frames", "8", "--limit", "4", "--num-threads", "1",
            "--out", str(tmp_path / "out"), "--data", str(tmp_path / "eval")]
    res = CliRunner().invoke(main, args + ["--calib-dir", str(tmp_path / "eval")])
    assert isinstance(res.exception, BadInput) and "evaluation image" in str(res.exception)
    res = CliRunner().invoke(main, args + ["--calib-dir", str(tmp_path / "cal")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["images"] == 4 and out["data"] == str(tmp_path / "eval") and out["calibration"] == str(tmp_path / "cal")


def test_no_matplotlib_no_png_one_warning(tmp_path, monkeypatch, capsys):
    import sys

    from edge_cbn.lab.divergence import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rows = [{"layer": "a", "kl_uncal": 0.2, "kl_cal": 0.1, "js_uncal": 0.05, "js_cal": 0.02, "ratio": 2.0}]
    assert plot(rows, "t", tmp_path / "x.png") is None and not (tmp_path / "x.png").exists()
    assert capsys.readouterr().err.count("warning: matplotlib is not installed") == 1


def test_the_spread_over_image_groups_is_zero_for_alike_groups_and_grows_with_their_differences():
    rng = np.random.default_rng(0)
    clean = [np.tile(rng.integers(1, 50, (1, 3, 6)), (4, 1, 1))]  # 4 groups of images, 3 channels, 6 bins
    alike = [np.tile(rng.integers(1, 50, (1, 3, 6)), (4, 1, 1))]
    assert np.allclose(bootstrap_spread(clean, alike, 1e-6), 0, atol=1e-9)
    unlike = [rng.integers(1, 50, (4, 3, 6))]
    assert bootstrap_spread(clean, unlike, 1e-6)[0] > 0.01
    assert image_groups(96, 8) == 6 and image_groups(16, 8) == 2 and image_groups(5, 8) == 1
