"""`edge-cbn evaluate` end to end on a tiny exported model: the table, the JSON line, bad options."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("keras")
pytest.importorskip("skimage")

from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.lab.evaluate.command import main  # noqa: E402
from edge_cbn.convert.export import export  # noqa: E402
from edge_cbn.runtime.noise import make_noise  # noqa: E402
from tiny import PRE, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return export(tiny_model(num_classes=4), tmp_path_factory.mktemp("ev") / "m.tflite", name="tiny",
                  task="classification", preprocess=PRE, labels=list("abcd"))


def run(model_path, *args):
    return CliRunner().invoke(main, ["--model", str(model_path), "--cal-frames", "12", "--eval-crops", "24",
                                     "--checkpoints", "6,12", "--num-threads", "1", *args])


def test_evaluate_reports_agreement_per_setting(model_path):
    res = run(model_path, "--noise", "none:0", "--noise", "relative:0.3", "--seeds", "0,1", "--crop-scale", "0.5,1")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["crop_scale"] == [0.5, 1.0] and out["cal_frames"] == 12 and out["eval_crops"] == 24
    assert out["noise_options"] == []
    rows = {(r["preset"], r["seed"]): r for r in out["rows"]}
    assert set(rows) == {("none", 0), ("none", 1), ("relative", 0), ("relative", 1)}
    for seed in (0, 1):  # no noise: the noisy model is the clean one, before and after calibration
        assert rows["none", seed]["uncalibrated"] == rows["none", seed]["calibrated@12"] == 100.0
    for key in ("uncalibrated", "calibrated@6", "calibrated@12"):
        assert 0 <= rows["relative", 0][key] <= 100
    assert "relative" in res.output and "calibrated@12" in res.output
    means = {m["preset"]: m for m in out["means"]}
    rel = means["relative"]
    assert rel["seeds"] == [0, 1]
    assert rel["uncalibrated"] == pytest.approx((rows["relative", 0]["uncalibrated"]
                                                 + rows["relative", 1]["uncalibrated"]) / 2)
    if rel["uncalibrated"] <= 99:
        assert rel["calibrated@12_recovered"] == pytest.approx(
            100 * (rel["calibrated@12"] - rel["uncalibrated"]) / (100 - rel["uncalibrated"]))
    assert means["none"]["calibrated@12_recovered"] is None  # nothing lost, no share
    # intervals over the crops and the chips: around the mean, none where nothing varies
    assert rel["uncalibrated_lo"] <= rel["uncalibrated"] <= rel["uncalibrated_hi"]
    assert rel["uncalibrated_hi"] - rel["uncalibrated_lo"] > 0 or rel["uncalibrated"] in (0.0, 100.0)
    assert means["none"]["calibrated@12_lo"] == means["none"]["calibrated@12_hi"] == 100.0
    assert means["none"]["calibrated@12_recovered_lo"] is None
    assert "percentile bootstrap" in res.output and "resampled" not in out["rows"][0]


def test_crop_means_on_resamples_weight_each_crop_as_often_as_drawn():
    from edge_cbn.lab.evaluate.command import crop_means

    values, mask = np.array([100.0, 0.0, 100.0, 0.0]), np.array([True, True, False, False])
    assert crop_means(values, mask) == (50.0, 50.0)
    every, confident = crop_means(values, mask, np.array([[1, 1, 1, 1], [2, 0, 0, 2], [0, 0, 2, 2.0]]))
    np.testing.assert_allclose(every, [50.0, 50.0, 50.0])
    np.testing.assert_allclose(confident[:2], [50.0, 100.0])
    assert np.isnan(confident[2])  # no confident crop drawn: that resample has no confident figure


def test_seed_means_recovered_share():
    from edge_cbn.lab.evaluate.command import seed_means

    rows = [{"preset": "paper", "eta": 0.25, "seed": s, "uncalibrated": u, "uncalibrated_confident": 40.0,
             "calibrated@8": c, "calibrated@8_confident": 100.0} for s, u, c in ((0, 10.0, 80.0), (1, 30.0, 90.0))]
    [m] = seed_means(rows, ["uncalibrated", "calibrated@8"])
    assert (m["uncalibrated"], m["calibrated@8"]) == (20.0, 85.0)
    assert m["calibrated@8_recovered"] == pytest.approx(100 * 65 / 80)
    assert m["calibrated@8_confident_recovered"] == pytest.approx(100.0)


@pytest.mark.parametrize("args,hint", [(["--crop-scale", "0.9,0.2"], "--crop-scale"),
                                       (["--crop-scale", "x"], "--crop-scale"),
                                       (["--noise", "bogus:0.1"], "--noise"),
                                       (["--noise", "relative:0.1", "--noise-option", "spatial_level=1"],
                                        "--noise-option")])
def test_evaluate_rejects_bad_options(model_path, args, hint):
    res = run(model_path, *args)
    assert res.exit_code == 2 and hint in res.output


def test_evaluate_passes_noise_options_to_every_chip(model_path, monkeypatch):
    import edge_cbn.lab.evaluate.command as ev

    calls = []

    def recording(preset, eta, seed, **options):
        calls.append((preset, options))
        return make_noise(preset, eta, seed, **options)

    monkeypatch.setattr(ev, "make_noise", recording)
    res = run(model_path, "--noise", "paper:0.3", "--noise", "relative:0.1", "--checkpoints", "12",
              "--noise-option", "t_granularity=weight", "--noise-option", "temporal_level=0.5")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["noise_options"] == [
        "t_granularity=weight", "temporal_level=0.5"]
    assert calls == [(p, {"t_granularity": "weight", "temporal_level": 0.5}) for p in ("paper", "relative")]


def test_static_calibration_and_split_same(model_path, monkeypatch):
    """--static-calibration calibrates on the same chip without its temporal draw; --split same
    calibrates on the evaluation crops themselves."""
    import edge_cbn.lab.evaluate.command as ev

    chips, crop_sets = [], []
    monkeypatch.setattr(ev, "make_noise", lambda *a, **k: chips.append(k.get("temporal", True)) or make_noise(*a, **k))

    class Recording(ev.DeviceCalibration):
        def calibrate(self, inputs, **kw):
            crop_sets.append(np.asarray(inputs)[:, 0])
            return super().calibrate(inputs, **kw)

    monkeypatch.setattr(ev, "DeviceCalibration", Recording)
    res = run(model_path, "--noise", "relative:0.2", "--checkpoints", "12", "--static-calibration", "--split", "same")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["static_calibration"] is True and out["split"] == "same"
    assert chips == [True, False]  # the evaluated chip keeps its temporal noise
    _, eval_rgb = ev.crops(ev.load_bundle(str(model_path)), "crops", 12, 24, scale=(0.15, 1.0))
    cal = crop_sets[0]
    assert len(cal) == 12 and (cal == ev.model_input(eval_rgb[:12], ev.load_bundle(str(model_path)))).all()


def test_photo_sets(model_path):
    from edge_cbn.lab.scenes.photos import NATURAL, load_photos

    natural, every = load_photos("natural"), load_photos("all")
    assert sorted(natural) == sorted(NATURAL) and set(natural) < set(every) and len(every) == 19
    assert all(img.ndim == 3 and img.shape[2] == 3 and img.dtype.name == "uint8" for img in natural.values())
    with pytest.raises(ValueError):
        load_photos("textures")
    from edge_cbn.lab.evaluate.command import crops
    from edge_cbn.lab.scenes.photos import random_crops

    bundle = load_bundle(str(model_path))
    side = bundle.meta["input_size"][0]
    _, ev = crops(bundle, "crops", 4, 8, photos="natural")
    assert (ev == random_crops(natural, 8, side, seed=2000)[0]).all()
    res = run(model_path, "--noise", "relative:0.2", "--checkpoints", "12", "--photos", "natural")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["photos"] == "natural"


def test_offline_reference_runs_at_the_given_batch_size(model_path, monkeypatch):
    """--offline --batch-size N: Algorithm 1 beside the streaming calibration, in batches of N."""
    import edge_cbn.convert.build as build
    import edge_cbn.convert.offline_calibration as oc

    sizes = []
    real = oc.calibrate_bn

    def recording(model, batches, **kw):
        batches = list(batches)
        sizes.append([len(b) for b in batches])
        return real(model, batches, **kw)

    monkeypatch.setattr(build, "build_model", lambda name: (None, tiny_model(num_classes=4)))
    monkeypatch.setattr(oc, "calibrate_bn", recording)
    res = run(model_path, "--noise", "relative:0.2", "--offline", "--batch-size", "5")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["offline_batch_size"] == 5
    assert sizes == [[5, 5, 2], [5, 5, 2]]  # 12 calibration frames, cumulative and EMA
    row = out["rows"][0]
    assert 0 <= row["offline_cumulative"] <= 100 and 0 <= row["offline_ema"] <= 100
