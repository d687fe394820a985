import numpy as np
import pytest

from edge_cbn.runtime.fold import fold_kernel, to_tflite
from edge_cbn.runtime.noise import parse_noise_options, PRESETS, make_noise

SHAPES = {"conv": (3, 3, 4, 6), "depthwise": (3, 3, 6, 1), "dense": (6, 5)}


def fake_layers(seed=0):
    rng = np.random.default_rng(seed)
    return {f"{kind}0": (kind, rng.standard_normal(shape).astype(np.float32))
            for kind, shape in SHAPES.items()}


def out_channels(kind, kernel):
    return kernel.shape[2] if kind == "depthwise" else kernel.shape[-1]


def ones_layer(n=20000):
    return {"w": ("dense", np.ones((n, 1), np.float32))}


@pytest.mark.parametrize("preset,options", [(p, {}) for p in PRESETS] + [
    ("paper", {"t_granularity": "channel", "s_granularity": "channel"}),
    ("paper", {"t_granularity": "weight", "spatial_reading": "absolute"}),
    ("relative", {"temporal": False}),
])
def test_folded_fast_path_equals_keras_path(preset, options):
    layers = fake_layers()
    rng = np.random.default_rng(1)
    scales = {name: rng.uniform(0.3, 3.0, out_channels(kind, k)).astype(np.float32)
              for name, (kind, k) in layers.items()}
    scales["dense0"] = None  # a layer without BN
    chip = make_noise(preset, 0.4, 7, **options).instantiate(layers)
    fast = chip.folded(scales)
    buffers = {name: np.zeros(k.size, np.float32) for name, (_, k) in layers.items()}
    for frame in (0, 3):
        fast.write(frame, buffers)
        for name, kernel in chip.perturb(frame).items():
            kind = layers[name][0]
            ref = to_tflite(kind, kernel) if scales[name] is None else \
                fold_kernel(kind, to_tflite(kind, kernel), scales[name])
            got = buffers[name].reshape(ref.shape)
            assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max(), (preset, name, frame)


def test_rescale_matches_fresh_fold():
    layers = fake_layers()
    chip = make_noise("additive-max", 0.3, 2).instantiate(layers)
    s_old, s_new = np.full(6, 2.0, np.float32), np.linspace(0.5, 1.5, 6).astype(np.float32)
    fast = chip.folded({"conv0": s_old})
    fast.rescale("conv0", s_new)
    fresh = chip.folded({"conv0": s_new})
    a, b = np.empty(216, np.float32), np.empty(216, np.float32)
    fast.write(4, {"conv0": a})
    fresh.write(4, {"conv0": b})
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "weight"])
def test_folded_write_is_the_precomputed_fold_bit_for_bit(granularity):
    """Folding on the fly gives (s*dev)*xi + s*base exactly, as precomputing s*base and s*dev did."""
    layers = fake_layers()
    chip = make_noise("relative", 0.3, 5, t_granularity=granularity).instantiate(layers)
    s = np.linspace(0.5, 2.0, 6).astype(np.float32)
    out = np.empty(216, np.float32)
    chip.folded({"conv0": s}).write(9, {"conv0": out})
    layer = chip.layers["conv0"]
    want = fold_kernel("conv", layer.dev, s) * chip.xi("conv0", 9) + fold_kernel("conv", layer.base, s)
    np.testing.assert_array_equal(out.reshape(want.shape), want)


def test_write_rejects_non_float32_or_wrong_size():
    chip = make_noise("relative", 0.3, 2).instantiate(fake_layers())
    fast = chip.folded({"dense0": None})
    with pytest.raises(ValueError):
        fast.write(0, {"dense0": np.zeros(30, np.float64)})
    with pytest.raises(ValueError):
        fast.write(0, {"dense0": np.zeros(31, np.float32)})


def test_paper_factor_statistics():
    eta = 0.5
    chip = make_noise("paper", eta, 3).instantiate(ones_layer())
    layer = chip.layers["w"]
    n_s = (layer.base.astype(np.float64) - 1) / eta  # base = W + eta * W * N_S
    assert abs(n_s.mean() - eta) < 0.01 and abs(n_s.std() - 0.1 * eta) < 0.005
    np.testing.assert_allclose(layer.dev, 0.2 * eta * n_s, rtol=1e-5)  # dev = sigma_T * W * N_S
    n_t = np.array([(chip.kernel("w", f)[0, 0] - 1) / n_s[0, 0] for f in range(3000)])
    assert abs(n_t.mean() - eta) < 0.01 and abs(n_t.std() - 0.2 * eta) < 0.01
    # read literally, eq. 2 mostly rescales the weights by 1 + eta^2
    assert abs(chip.kernel("w", 0).mean() - (1 + eta**2)) < 0.05


def test_paper_absolute_spatial_reading():
    chip = make_noise("paper", 0.5, 3, spatial_reading="absolute").instantiate(ones_layer())
    assert abs(((chip.layers["w"].base - 1) / 0.5).std() - 0.1) < 0.005


def test_relative_and_additive_max_statistics():
    eta = 0.3
    w = np.random.default_rng(0).uniform(0.5, 2.0, (20000, 1)).astype(np.float64)
    for preset, ref in (("relative", w), ("additive-max", np.abs(w).max())):
        chip = make_noise(preset, eta, 1).instantiate({"w": ("dense", w)})
        layer = chip.layers["w"]
        eps = ((layer.base.T - w) / (eta * ref)).ravel()  # base = W + eta * R * eps_S
        assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02
        np.testing.assert_allclose(layer.dev.T, 0.2 * eta * ref * eps[:, None], rtol=1e-4, atol=1e-6)
        if preset == "additive-max":
            assert abs(np.corrcoef(eps, w.ravel())[0, 1]) < 0.05
        n_t = [((chip.kernel("w", f) - w)[0, 0] / (ref * eps[:, None])[0, 0]) for f in range(2000)]
        assert abs(np.mean(n_t) - eta) < 0.01 and abs(np.std(n_t) - 0.2 * eta) < 0.01


def test_spatial_fixed_per_seed_temporal_per_frame():
    layers = fake_layers()
    a = make_noise("relative", 0.3, 5).instantiate(layers)
    b = make_noise("relative", 0.3, 5).instantiate(layers)
    c = make_noise("relative", 0.3, 6).instantiate(layers)
    for name in layers:
        np.testing.assert_array_equal(a.layers[name].base, b.layers[name].base)
        np.testing.assert_array_equal(a.layers[name].dev, b.layers[name].dev)
        assert not np.allclose(a.layers[name].base, c.layers[name].base)
    k0, k1, again = a.perturb(0), a.perturb(1), b.perturb(0)
    for name in layers:
        np.testing.assert_array_equal(k0[name], again[name])
        assert not np.allclose(k0[name], k1[name])
        # per-tensor N_T: two frames differ by one scalar factor on the fixed spatial pattern
        w = layers[name][1]
        ratio = (k1[name] - w) / (k0[name] - w)
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-3)


def test_static_mode_is_frame_independent():
    chip = make_noise("relative", 0.3, 5, temporal=False).instantiate(fake_layers())
    assert chip.static
    k0, k9 = chip.perturb(0), chip.perturb(9)
    assert all(np.array_equal(k0[n], k9[n]) for n in k0)
    assert make_noise("none").instantiate(fake_layers()).static


def test_determinism_independent_of_layer_order_and_set():
    layers = fake_layers()
    full = make_noise("paper", 0.4, 11, t_granularity="weight").instantiate(layers)
    reordered = make_noise("paper", 0.4, 11, t_granularity="weight").instantiate(
        dict(reversed(list(layers.items()))))
    alone = make_noise("paper", 0.4, 11, t_granularity="weight").instantiate(
        {"depthwise0": layers["depthwise0"]})
    for chip in (reordered, alone):
        for name in chip.layers:
            np.testing.assert_array_equal(chip.kernel(name, 2), full.kernel(name, 2))


def test_pcm_drift_shrinks_conductance_over_time():
    w = np.random.default_rng(0).uniform(-1, 1, (3000, 8)).astype(np.float32)
    mags = []
    for t in (0.0, 100.0, 1e4, 1e6):
        chip = make_noise("pcm", 0.0, 1, t_inference=t).instantiate({"w": ("dense", w)})
        mags.append(np.abs(chip.layers["w"].base).sum())
    assert mags[0] == pytest.approx(np.abs(w).sum(), rel=1e-6)  # eta=0, t=t0: no noise, no drift
    assert all(a > b for a, b in zip(mags, mags[1:]))
    nu = -np.log(mags[-1] / mags[0]) / np.log((1e6 + 20) / 20)
    assert 0.04 <= nu <= 0.1  # aihwkit's mean drift exponent is clipped to [0.049, 0.1]


def test_pcm_programming_and_read_noise_at_g_max():
    chip = make_noise("pcm", 1.0, 1, t_inference=0.0).instantiate(ones_layer(40000))
    err = (chip.layers["w"].base - 1.0) * 25.0  # in µS: g+ prog noise minus clamped g- prog noise
    half = 0.26348 * np.sqrt(1 / 2 - 1 / (2 * np.pi))
    assert abs(err.mean() + 0.26348 / np.sqrt(2 * np.pi)) < 0.02
    assert abs(err.std() - np.hypot(0.26348 + 1.9650 - 1.1731, half)) < 0.03
    read = 0.0088 * np.sqrt(np.log((20 + 250e-9) / (2 * 250e-9)))  # relative read noise at g_max
    assert np.median(chip.layers["w"].dev) == pytest.approx(read, rel=0.05)
    assert abs(make_noise("pcm", 2.0, 1, t_inference=0.0).instantiate(ones_layer(40000))
               .layers["w"].dev.mean() / chip.layers["w"].dev.mean() - 2) < 0.05


def test_bad_names_raise():
    with pytest.raises(ValueError):
        make_noise("gaussian", 0.1)
    with pytest.raises(ValueError):
        make_noise("paper", 0.1, t_granularity="pixel")
    with pytest.raises(ValueError, match="t_inference"):  # a pcm option, not relative's
        make_noise("relative", 0.1, t_inference=5.0)
    with pytest.raises(ValueError):
        make_noise("none").instantiate({"x": ("lstm", np.ones((2, 2)))})


def test_noise_options_from_the_command_line():
    opts = parse_noise_options("paper", ["t_granularity=weight", "temporal-level=0.3", "spatial_reading=absolute"])
    assert opts == {"t_granularity": "weight", "temporal_level": 0.3, "spatial_reading": "absolute"}
    noise = make_noise("paper", 0.2, 0, **opts)
    assert (noise.t_granularity, noise.t_std, noise.s_std) == ("weight", pytest.approx(0.06), 0.1)
    assert parse_noise_options("pcm", ["t_inference=60"]) == {"t_inference": 60.0}
    assert make_noise("pcm", 1.0, 0, prog_coeff=(0.1, 0.0, 0.0)).prog_coeff == (0.1, 0.0, 0.0)  # Python only
    with pytest.raises(ValueError):
        parse_noise_options("pcm", ["prog_coeff=0.1"])
    for preset, item in (("relative", "spatial_level=0.2"), ("relative", "temporal_level"),
                         ("relative", "temporal_level=x"), ("none", "t_granularity=weight"),
                         ("relative", "t_granularity=pixel"), ("paper", "spatial_reading=both")):
        with pytest.raises(ValueError):
            parse_noise_options(preset, [item])


@pytest.mark.parametrize("preset, eta, options, named", [
    ("relative", 1e30, {}, "eta"), ("relative", float("nan"), {}, "eta"), ("relative", -0.1, {}, "eta"),
    ("relative", 0.05, {"temporal_level": float("nan")}, "temporal_level"),
    ("additive-max", 0.05, {"temporal_level": float("inf")}, "temporal_level"),
    ("paper", 0.3, {"spatial_level": float("nan")}, "spatial_level"),
    ("pcm", 1.0, {"g_max": float("nan")}, "g_max"), ("pcm", 1.0, {"g_max": 0.0}, "g_max"),
    ("pcm", 1.0, {"t_read": -1.0}, "t_read"), ("pcm", 1.0, {"drift_scale": float("inf")}, "drift_scale"),
])
def test_non_finite_or_out_of_range_levels_are_refused(preset, eta, options, named):
    """A NaN, Inf, negative or huge level served every frame as NaN (issue 23): refused, naming the value."""
    with pytest.raises(ValueError, match=named):
        make_noise(preset, eta, 0, **options)
    make_noise(preset, 0.05, 0)  # the preset itself is fine


def test_the_command_line_refuses_such_levels_as_usage_errors():
    from click.testing import CliRunner

    from edge_cbn.cli import main

    for args, named in ((["--eta", "1e30"], "above 10"), (["--eta", "nan"], "finite"),
                        (["--noise-option", "temporal_level=nan"], "temporal_level=nan must be a finite number")):
        result = CliRunner().invoke(main, ["stream", "--noise", "relative", *args, "--frames", "1"])
        assert result.exit_code == 2 and named in result.output, result.output


def test_the_unit_mean_reading_at_eta0_is_the_preset_at_its_square_root():
    """docs/NOISE.md: eq. 2 with N_S ~ N(1, 0.1^2) at the paper's eta0 is the `paper` preset's default
    (relative) reading at sqrt(eta0), draw for draw: the same chip to float32 rounding."""
    import math

    rng = np.random.default_rng(0)
    layers = {f"l{i}": ("conv", rng.standard_normal((3, 3, 8, 16)).astype(np.float32)) for i in range(3)}
    layers["fc"] = ("dense", rng.standard_normal((16, 10)).astype(np.float32))
    for eta0 in (0.1, 0.16, 0.25):
        unit = make_noise("paper", eta0, 5, spatial_reading="unit-mean").instantiate(layers)
        preset = make_noise("paper", math.sqrt(eta0), 5).instantiate(layers)
        for name in layers:
            for mine, theirs in ((unit.layers[name].base, preset.layers[name].base),
                                 (unit.layers[name].dev, preset.layers[name].dev)):
                np.testing.assert_array_max_ulp(mine, theirs, maxulp=4)
            assert unit.xi(name, 7) == preset.xi(name, 7)
        # and not the literal reading at the same number: that one is a different, much weaker chip
        literal = make_noise("paper", eta0, 5).instantiate(layers)
        assert not np.allclose(literal.layers["fc"].base, unit.layers["fc"].base, rtol=1e-3)
    with pytest.raises(ValueError, match="spatial_reading must be one of"):
        make_noise("paper", 0.1, spatial_reading="unit")
