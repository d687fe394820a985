"""The device install: `device/install.sh` into a fresh virtual environment (no system site packages) with
the base dependencies only — no TensorFlow there — then `edge-cbn stream` from that environment on a
model exported here.  pip may download the base dependencies (its cache makes reruns fast)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "device" / "install.sh"


def test_install_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    for script in (INSTALL, REPO / "device" / "emulate.sh"):
        if shutil.which("shellcheck") or os.environ.get("CI"):  # CI installs it (.ci/run)
            subprocess.run(["shellcheck", str(script)], check=True)
    unit = (REPO / "device" / "edge-cbn.service").read_text()
    assert "Restart=on-failure" in unit
    for flag in ("--camera 0", "--headless", "--serve 8080", "--host 0.0.0.0", "--state /var/lib/edge-cbn/state.npz",
                 "--model /var/lib/edge-cbn/model.tflite", "--quiet"):
        assert flag in unit


@pytest.mark.slow
def test_device_install_runs_without_tensorflow(tmp_path):
    from test_stream import export_tiny

    model = export_tiny(tmp_path / "export" / "tiny.tflite")
    prefix, data = tmp_path / "venv", tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"))}
    subprocess.run(["bash", str(INSTALL), "--no-apt", "--no-service", "--prefix", str(prefix), "--data", str(data),
                    str(model)], check=True, env=env, timeout=600)
    assert not (prefix / "pyvenv.cfg").read_text().count("include-system-site-packages = true")
    python, edge_cbn = prefix / "bin" / "python", prefix / "bin" / "edge-cbn"
    assert subprocess.run([str(python), "-c", "import tensorflow"], env=env, capture_output=True).returncode != 0
    installed = subprocess.run([str(python), "-c", "import edge_cbn; print(edge_cbn.__file__)"], env=env,
                               capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert str(prefix) in installed  # the venv's copy, not the checkout

    log = tmp_path / "s.jsonl"
    subprocess.run([str(edge_cbn), "stream", "--model", str(data / "model.tflite"), "--frames", "50", "--headless",
                    "--log", str(log)], check=True, env=env, cwd=tmp_path, timeout=300)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len([x for x in lines if "frame" in x]) == 50 and lines[-1]["summary"]["frames"] == 50

    # The device path with noise, calibration and a saved state works without TensorFlow too.
    subprocess.run([str(edge_cbn), "stream", "--model", str(data / "model.tflite"), "--frames", "20", "--headless",
                    "--quiet", "--noise", "relative", "--stages", "2", "--refold-every", "2", "--calibrate-every", "1",
                    "--state", str(data / "state.npz"), "--log", str(log)], check=True, env=env, cwd=tmp_path,
                   timeout=300)
    summary = json.loads(log.read_text().splitlines()[-1])["summary"]
    assert summary["refolds"] >= 1 and summary["calibrated"]
    assert (data / "state.calibrated.tflite").is_file()


def fake_bundle(folder: Path) -> Path:
    model = folder / "m.tflite"
    for path in (model, folder / "m.cbn.npz", folder / "m.calib.tflite", folder / "m.sweep.tflite"):
        path.write_bytes(b"x")
    return model


def test_dry_run_prints_every_command_and_changes_nothing(tmp_path):
    model = fake_bundle(tmp_path)
    prefix, data = tmp_path / "venv", tmp_path / "data"
    out = subprocess.run(["bash", str(INSTALL), "--dry-run", "--prefix", str(prefix), "--data", str(data),
                          "--args", "--noise relative", str(model)], capture_output=True, text=True, check=True).stdout
    for command in ("+ apt-get install", f"+ python3 -m venv {prefix}", f"{prefix}/bin/python -m pip install",
                    "--constraint /tmp/edge-cbn-install.XXXXXX/constraints.txt", "    numpy==",
                    f"+ install -m 0644 {model}", f"+ install -m 0644 {tmp_path / 'm.sweep.tflite'}",
                    "+ useradd --system", "+ systemctl enable edge-cbn.service",
                    "+ write /etc/default/edge-cbn:", 'EDGE_CBN_ARGS="--noise relative"',
                    "+ write /etc/systemd/system/edge-cbn.service:", f"--model {data}/model.tflite"):
        assert command in out, command
    assert not prefix.exists() and not data.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.calib.tflite", "m.cbn.npz", "m.sweep.tflite", "m.tflite"]


def test_a_32_bit_board_without_wheels_is_refused_with_one_sentence(tmp_path):
    """armv7l: PyPI has no numpy<2 or opencv-python-headless wheel for it, so install.sh asks the index
    first and stops before building anything (pip may ask the registry: a few seconds)."""
    prefix = tmp_path / "venv"
    done = subprocess.run(["bash", str(INSTALL), "--no-apt", "--no-service", "--prefix", str(prefix), "--data",
                           str(tmp_path / "data"), str(fake_bundle(tmp_path))], capture_output=True, text=True,
                          env=dict(os.environ, EDGE_CBN_ARCH="armv7l"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "64-bit Raspberry Pi OS" in done.stderr
    assert "numpy<2 or opencv-python-headless" in done.stderr
    assert not prefix.exists()


def test_the_board_pins_name_every_runtime_dependency_and_satisfy_it():
    """device/constraints.txt (what install.sh installs on a 64-bit board and the board check runs) pins
    every base dependency that a 64-bit Linux board needs, at a version pyproject.toml allows."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = Path(__file__).parents[1]
    lines = [line.strip() for line in (root / "device" / "constraints.txt").read_text().splitlines()]
    pins = {canonicalize_name(name): version for name, version in
            (line.split("==") for line in lines if line and not line.startswith("#"))}
    for machine in ("aarch64", "x86_64"):
        board = {"platform_system": "Linux", "platform_machine": machine, "python_version": "3.11",
                 "sys_platform": "linux", "implementation_name": "cpython"}
        for dependency in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]:
            req = Requirement(dependency)
            if req.marker is None or req.marker.evaluate(board):
                name = canonicalize_name(req.name)
                assert name in pins and req.specifier.contains(pins[name]), (dependency, pins.get(name))
