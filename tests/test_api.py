"""docs/API.md's example runs as written, and the package exports what that page lists."""
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import edge_cbn

API_DOC = Path(__file__).parents[1] / "docs" / "API.md"


def test_the_package_exports_the_documented_entry_points():
    names = set(re.findall(r"^\| `(\w+)", API_DOC.read_text(), re.M))
    assert {"load_bundle", "NoisyModel", "DeviceCalibration", "Refolder", "export", "calibrate_bn"} <= names
    for name in names | {"make_noise", "noise_targets", "StreamLoop", "StreamOptions"}:
        assert callable(getattr(edge_cbn, name)), name
    with pytest.raises(AttributeError):
        edge_cbn.no_such_thing


def test_the_api_example_calibrates_a_folder_of_frames(tmp_path):
    pytest.importorskip("tensorflow")
    from tiny import PRE, tiny_model

    from edge_cbn.convert.export import export

    path = export(tiny_model(num_classes=4), tmp_path / "m.tflite", name="m", task="classification",
                  preprocess=PRE, labels=list("abcd"))
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(frames / f"{i:03d}.jpg"), rng.integers(0, 256, (48, 64, 3), np.uint8))
    code = re.search(r"```python\n(.*?)```", API_DOC.read_text(), re.S).group(1)
    (tmp_path / "calibrate_folder.py").write_text(code)
    out = subprocess.run([sys.executable, "calibrate_folder.py", str(path), str(frames)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    top = eval(out.strip().splitlines()[-1])  # [(class_id, label, probability), ...] best first
    assert [label for _, label, _ in top] and all(label in "abcd" for _, label, _ in top)
    assert 0 < top[0][2] <= 1
