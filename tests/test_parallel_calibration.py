"""`tools/convert.py --calibrate … --workers N | --ray ADDRESS`: Algorithm 1's batches on worker processes or
a real Ray cluster, merged in batch order into the statistics of one process (cumulative and EMA); the
EMA's dependence on order, shown on the merge itself."""
import cv2
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("keras")

from edge_cbn.cluster.local import LocalPool  # noqa: E402
from edge_cbn.convert.offline_calibration import (calibrate_bn, calibrate_on_images, image_batches,  # noqa: E402
                                                  image_files, keras_noise_targets)
from edge_cbn.convert.parallel_calibration import calibrate_in_parallel  # noqa: E402
from edge_cbn.runtime.moments import EMA  # noqa: E402
from edge_cbn.runtime.noise import make_noise  # noqa: E402
from tiny import PRE, SIZE, tiny_model  # noqa: E402

NOISE = {"noise": "relative", "eta": 0.2, "seed": 3}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """11 images: batches of 3 leave a last batch of 2."""
    folder = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    for i in range(11):
        cv2.imwrite(str(folder / f"{i:02d}.png"), rng.integers(0, 256, (20, 24, 3), np.uint8))
    return image_files(folder)


def one_process(files, estimator):
    model = tiny_model()
    chip = make_noise(NOISE["noise"], NOISE["eta"], NOISE["seed"]).instantiate(keras_noise_targets(model))
    return calibrate_bn(model, image_batches(files, PRE, SIZE, 3), chip=chip, estimator=estimator, momentum=0.9)


def parallel(files, pool, estimator):
    return calibrate_in_parallel(tiny_model(), files, pool, preprocess=PRE, batch_size=3, estimator=estimator,
                                 momentum=0.9, max_units=3, **NOISE)


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[bn][i] - b[bn][i]) / np.maximum(np.abs(a[bn][i]), 1e-30)))
               for bn in a for i in (0, 1))


def test_local_workers_give_the_one_process_statistics(files):
    """Cumulative (the default), 4 batches in runs of 2 on 2 spawned workers."""
    merged = parallel(files, LocalPool(2), "cumulative")
    assert max_relative_difference(merged, one_process(files, "cumulative")) <= 1e-6


@pytest.mark.parametrize("estimator", ["cumulative", "ema"])
def test_a_ray_cluster_gives_the_one_process_statistics(ray_cluster, files, estimator):
    from edge_cbn.cluster.ray_pool import RayPool

    merged = parallel(files, RayPool(ray_cluster), estimator)
    assert max_relative_difference(merged, one_process(files, estimator)) <= 1e-6


def test_the_ema_depends_on_the_order_of_the_runs():
    """Folded in batch order the runs give the sequential EMA; in another order, another estimate. The
    cumulative average is the same either way."""
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=4), rng.uniform(1, 2, 4)) for _ in range(6)]
    for momentum in (0.9, None):
        sequential = EMA(momentum, init=(np.zeros(4), np.ones(4))) if momentum else EMA(None)
        runs = [EMA(momentum) for _ in range(3)]
        for i, (mean, var) in enumerate(batches):
            sequential.update(mean, var)
            runs[i // 2].update(mean, var)
        for order, same in (((0, 1, 2), True), ((1, 0, 2), momentum is None)):
            merged = EMA(momentum, init=(np.zeros(4), np.ones(4))) if momentum else EMA(None)
            for k in order:
                merged.merge(runs[k])
            assert np.allclose(merged.mean, sequential.mean, rtol=1e-12) == same
            assert np.allclose(merged.var, sequential.var, rtol=1e-12) == same


def test_convert_cli_on_ray_writes_the_one_process_statistics(ray_cluster, files, tmp_path):
    """tools/convert.py --calibrate --ray: the exported statistics are those of Algorithm 1 in this process
    on the same random weights (Keras seeded alike for both builds)."""
    import keras

    from edge_cbn.convert.build import build_model
    from edge_cbn.convert.command import main as convert
    from edge_cbn.runtime.bundle import load_bundle

    keras.utils.set_random_seed(0)
    spec, model = build_model("resnet18", input_size=32, allow_random=True)
    here = calibrate_on_images(spec, model, files, noise="relative", eta=0.1, batch_size=4)
    keras.utils.set_random_seed(0)
    res = CliRunner().invoke(convert, ["--model", "resnet18", "--random-weights", "--input-size", "32", "--quiet",
                                       "--calibrate", str(files[0].parent), "--noise", "relative", "--eta", "0.1",
                                       "--batch-size", "4", "--ray", ray_cluster, "--no-sweep",
                                       "-o", str(tmp_path / "m.tflite")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    exported = {r.bn: (r.mean, r.var) for r in load_bundle(tmp_path / "m.tflite").layers if r.bn}
    assert exported.keys() == here.keys()
    for bn, (mean, var) in here.items():
        np.testing.assert_allclose(exported[bn][0], mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(exported[bn][1], var, rtol=1e-6)
