"""tools/convert.py (edge_cbn.convert): errors, offline calibration, and the real default model."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tensorflow")

from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.convert.command import main as convert  # noqa: E402
from predict import Predictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(args):
    return CliRunner().invoke(convert, args, catch_exceptions=False)


def test_unknown_model_and_missing_weights_are_clear_errors(tmp_path):
    r = run(["--model", "resnet9000", "-o", str(tmp_path / "a.tflite")])
    assert r.exit_code == 2 and "unknown model 'resnet9000'" in r.output
    r = run(["--model", "resnet18", "-o", str(tmp_path / "a.tflite")])
    assert r.exit_code == 2 and "resnet18-f37072fd.pth" in r.output and "--weights" in r.output


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(b"".join(pickle.dumps(o, protocol=2) for o in (0x1950A86A20F9469CFC6C, 1001, {}))
                     + pickle.dumps({"conv1.weight": Evil()}, protocol=2))
    r = run(["--model", "resnet18", "--weights", str(evil), "-o", str(tmp_path / "a.tflite")])
    assert r.exit_code == 1 and "refusing to load" in r.output
    assert not marker.exists()


def test_wrong_weight_file_names_the_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.pth"
    torch.save({"features.0.0.weight": torch.zeros(32, 3, 3, 3)}, path)
    r = run(["--model", "mobilenet_v2", "--weights", str(path), "--input-size", "32", "-o", str(tmp_path / "a.tflite")])
    assert r.exit_code == 1 and "features.0.1.weight" in r.output and "missing" in r.output


def test_offline_calibration_under_noise(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    plain, cal = tmp_path / "plain.tflite", tmp_path / "cal.tflite"
    # --no-sweep: the calibration variant without the sweep's (the stream calibrates such a model depth first)
    common = ["--model", "mobilenet_v2", "--random-weights", "--input-size", "32", "--quiet", "--no-sweep"]
    assert run(common + ["-o", str(plain)]).exit_code == 0
    r = run(common + ["-o", str(cal), "--calibrate", str(images), "--noise", "relative", "--eta", "0.1",
                      "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    a, b = load_bundle(plain), load_bundle(cal)
    assert cal.with_name("cal.calib.tflite").exists() and not cal.with_name("cal.sweep.tflite").exists()
    assert b.can_calibrate and not b.can_sweep and "sweep" not in b.meta
    moved = [not np.allclose(ra.mean, rb.mean) for ra, rb in zip(a.layers, b.layers) if ra.bn]
    assert all(moved)
    r = run(common + ["-o", str(cal), "--calibrate", str(tmp_path / "plain.tflite")])
    assert r.exit_code == 2
    r = run(common + ["-o", str(cal), "--calibrate", str(images), "--noise", "relative", "--noise-option", "x=1"])
    assert r.exit_code == 2 and "--noise-option" in r.output


def test_default_model_classifies_the_cat_and_the_espresso(tmp_path):
    """README's main path: the embedded EfficientNet-Lite0 with the real ImageNet weights, built on first
    use into the cache, run through LiteRT."""
    skimage = pytest.importorskip("skimage.data")
    env = dict(os.environ, EDGE_CBN_CACHE=str(tmp_path))
    code = "from edge_cbn.stream.resolve import resolve_model; print(resolve_model(None))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path and path.exists()
    runner = Predictor(load_bundle(path), num_threads=2)
    for photo, cls in (("chelsea", 285), ("coffee", 967)):
        top = runner(cv2.cvtColor(getattr(skimage, photo)(), cv2.COLOR_RGB2BGR))
        assert top[0][0] == cls, (photo, top[:3])
