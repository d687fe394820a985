"""Workstation commands print edge-cbn's own lines, not TensorFlow's C++ start-up noise (unless --verbose)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

CONVERT = Path(__file__).parents[1] / "tools" / "convert.py"
NOISE = ("oneDNN", "cuda", "cuInit", "absl::InitializeLog", "cpu_feature_guard", "I0000", "E0000", "W0000")


@pytest.mark.slow
def test_convert_prints_only_its_own_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    args = [sys.executable, str(CONVERT), "--model", "mobilenet_v2", "--random-weights", "--input-size", "32",
            "--num-classes", "4", "--no-sweep", "-o", str(tmp_path / "m.tflite")]
    quiet = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    noise = [line for line in quiet.stderr.splitlines() if any(n in line for n in NOISE)]
    assert noise == [], noise
    assert "folding BatchNorm" in quiet.stderr
    loud = subprocess.run(args + ["--verbose"], env=env, capture_output=True, text=True, check=True)
    assert any(n in loud.stderr for n in NOISE)
