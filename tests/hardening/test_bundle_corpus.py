"""Hostile `.tflite` files, sidecars and calibration variants (tests/hardening/bundle_corpus.py), each
loaded in a forked child within the harness's bounds: every one is refused at load with one line naming
the file that is wrong, and nothing in them executes.  Then a few through the real CLI: exit status 1 and
exactly one line on stderr; a partial copy without `X.calib.tflite` streams uncalibrated with one warning,
or is one error line when calibration is asked for."""
import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edge_cbn.runtime.bundle import load_bundle
from edge_cbn.runtime.flatbuffer import buffer_span
from edge_cbn.runtime.errors import BadInput

from .bundle_corpus import CALIBRATION_CASES, MODEL_CASES, SIDECAR_CASES, load_case
from .harness import run_case

pytestmark = pytest.mark.hardening

# What some refusals must say, beyond naming the file.
REASONS = {
    "input-70000x70000": "input shape", "input-type-int8": "input tensor type", "float-constant-nan": "non-finite",
    "other-models-sidecar": "another model", "swapped-kernel-buffers": "another model",
    "shared-kernel-buffer": "shared", "var-negative": "negative variance", "var-nan": "non-finite",
    "kernel-float64": "dtype", "pickled-object-member": "dtype object", "input-size-70000x70000": "input_size",
    "input-size-0x0": "input_size", "no-task": "task", "labels-a-string": "labels", "mean-length-2": "mean",
    "labels-3-for-4-classes": "3 labels", "kernel-claims-40GB": "kernel buffer", "meta-claims-400MB": "characters",
    "calibration-file-traversal": "file name", "format-2": "format 2",
    "a-directory": "is a directory", "truncated-half": "not a", "schema-version-2": "schema version",
}


def test_the_genuine_bundle_loads(genuine, tmp_path):
    for case in (MODEL_CASES[0], SIDECAR_CASES[0], CALIBRATION_CASES[0]):  # the loaders the cases go through
        (tmp_path / case.kind).mkdir()
        for src in (genuine.model, genuine.sidecar, genuine.calib):
            shutil.copy(src, tmp_path / case.kind / src.name)
        assert run_case(load_case, case.kind, None, tmp_path / case.kind / "tiny.tflite").kind == "loaded"
    bundle = load_bundle(genuine.model)
    assert bundle.can_calibrate and bundle.calibration_variant().path == genuine.calib


@pytest.mark.parametrize("case", MODEL_CASES + SIDECAR_CASES + CALIBRATION_CASES, ids=lambda c: f"{c.kind}-{c.name}")
def test_hostile_bundle_is_refused_in_one_line(case, genuine, tmp_path, canary):
    model, named = case.build(tmp_path, genuine)
    result = run_case(load_case, case.kind, named, model)
    assert result.ok_refusal(named), result
    assert REASONS.get(case.name, "") in result.message, result
    assert not canary.exists(), "a pickled payload ran"


def test_random_damage_to_the_model_is_refused_or_harmless(genuine, tmp_path):
    """60 seeded random damages of the .tflite (1-4 flipped bits, or a zeroed run of 1-64 bytes), each
    loaded in a forked child: refused in one line naming the model (or its sidecar, which no longer
    matches it), or loaded (a flip in a weight's low bits is a valid model); never another exception, a
    crash of LiteRT, a hang or a memory blow-up."""
    rng = np.random.default_rng(14)
    for src in (genuine.sidecar, genuine.calib):
        shutil.copy(src, tmp_path / src.name)
    model, data, outcomes = tmp_path / "tiny.tflite", genuine.model.read_bytes(), collections.Counter()
    for i in range(60):
        damaged = bytearray(data)
        if i % 2:
            for _ in range(rng.integers(1, 5)):
                damaged[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        else:
            start = int(rng.integers(len(data)))
            end = min(start + int(rng.integers(1, 65)), len(data))
            damaged[start:end] = bytes(end - start)
        model.write_bytes(bytes(damaged))
        result = run_case(load_bundle, model)
        # A damaged buffer table can also make the sidecar disagree with the model: then it names the sidecar.
        sidecar = model.with_name(genuine.sidecar.name)
        assert result.kind == "loaded" or result.ok_refusal(model) or result.ok_refusal(sidecar), (i, result)
        outcomes[result.kind] += 1
    assert outcomes["refused"] >= 20, outcomes  # the damage is real: much of it is caught


def test_partial_copy_without_the_calibration_variant(genuine, tmp_path):
    for src in (genuine.model, genuine.sidecar):
        shutil.copy(src, tmp_path / src.name)
    bundle = load_bundle(tmp_path / "tiny.tflite")
    assert bundle.has_sidecar and not bundle.can_calibrate
    assert "tiny.calib.tflite is missing" in bundle.calibration_problem and "partial copy" in bundle.calibration_problem
    with pytest.raises(BadInput, match="copy tiny.calib.tflite too"):
        bundle.calibration_variant()


def _cli(*args):
    """`edge-cbn stream ARGS` in a subprocess (started, not waited for)."""
    return subprocess.Popen([sys.executable, "-c", "from edge_cbn.cli import main; main()", "stream", *args,
                             "--frames", "3", "--headless", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "EDGE_CBN_DEBUG": ""})


def test_cli_refuses_hostile_bundles_in_one_line(genuine, tmp_path_factory):
    """Corrupt inputs through the real CLI (run side by side): exit 1, exactly one line on stderr naming
    the file, no traceback.  Without its calibration variant a model streams uncalibrated with one warning
    under noise, and is one error line with --calibrate."""
    cases = {name: next(c for c in MODEL_CASES + SIDECAR_CASES if c.name == name)
             for name in ("truncated-half", "other-models-sidecar", "input-size-70000x70000", "float-constant-nan")}
    runs = {}
    for name, case in cases.items():
        model, named = case.build(tmp_path_factory.mktemp(name), genuine)
        runs[name] = (named, _cli("--model", str(model)))
    partial = tmp_path_factory.mktemp("partial")
    for src in (genuine.model, genuine.sidecar):
        shutil.copy(src, partial / src.name)
    runs["asked"] = (partial / "tiny.tflite", _cli("--model", str(partial / "tiny.tflite"), "--noise", "relative",
                                                   "--calibrate"))
    runs["default"] = (None, _cli("--model", str(partial / "tiny.tflite"), "--noise", "relative"))
    for name, (named, proc) in runs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        if name == "default":
            assert proc.returncode == 0 and len(lines) == 1 and lines[0].startswith("warning:"), err
            assert "tiny.calib.tflite" in lines[0] and '"calibrated": false' in out
            continue
        assert proc.returncode == 1 and len(lines) == 1, (name, err)
        assert str(named.name) in lines[0] and "Traceback" not in err, (name, err)


def _sidecar_meta_changed(sidecar, change):
    """Rewrite the sidecar at `sidecar` with its meta changed by `change(meta)`."""
    with np.load(sidecar) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    change(meta)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(sidecar, "wb") as f:
        np.savez(f, **arrays)


def test_a_flipped_bit_in_a_weight_is_refused_by_the_recorded_sha256(genuine, tmp_path):
    """Without noise a flipped weight bit served changed outputs with nothing to say so; the sidecar now
    records the model's and the calibration variant's sha256, checked at load."""
    for src in (genuine.model, genuine.sidecar, genuine.calib):
        shutil.copy(src, tmp_path / src.name)
    model, calib = tmp_path / genuine.model.name, tmp_path / genuine.calib.name
    for path in (model, calib):  # a bit in the middle of a layer's kernel buffer: a valid model, other outputs
        bundle = load_bundle(genuine.model)
        index = bundle.layers[-1].w_buffer if path == model else bundle.meta["calibration"]["buffers"][
            bundle.layers[-1].name][0]
        start, size = buffer_span(path.read_bytes(), index)
        data = bytearray(path.read_bytes())
        data[start + size // 2] ^= 0x01
        path.write_bytes(bytes(data))
        if path == model:
            with pytest.raises(BadInput, match="do not match the sha256 tiny.cbn.npz records") as error:
                load_bundle(model)
            assert str(model) in str(error.value)
            shutil.copy(genuine.model, model)
    with pytest.raises(BadInput, match="do not match the sha256") as error:
        load_bundle(model).calibration_variant()
    assert str(calib) in str(error.value)


def test_a_bundle_exported_before_sidecars_recorded_a_sha256_still_loads(genuine, tmp_path):
    for src in (genuine.model, genuine.sidecar, genuine.calib):
        shutil.copy(src, tmp_path / src.name)
    sidecar = tmp_path / genuine.sidecar.name
    _sidecar_meta_changed(sidecar, lambda m: (m.pop("model_sha256"), m["calibration"].pop("sha256")))
    assert load_bundle(tmp_path / genuine.model.name).calibration_variant().path.name == genuine.calib.name
    _sidecar_meta_changed(sidecar, lambda m: m.update(model_sha256="not a sha256"))
    with pytest.raises(BadInput, match="is not a sha256") as error:
        load_bundle(tmp_path / genuine.model.name)
    assert str(sidecar) in str(error.value)
