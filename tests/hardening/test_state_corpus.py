"""Corrupt `--state` files (tests/hardening/bundle_corpus.py), each loaded in a forked child within the
harness's bounds the way the stream loads one (source bundle, state, calibrator): every one is refused
with one line naming the state file, and nothing in them executes.  What the stream then does with a bad
state: sets it aside (renamed, bytes kept) with one warning and starts fresh, never resuming nor saving
over it, with the calibrated model beside it; a state of another setup is kept under its setup's name; a
--state that cannot be written is one line at start."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edge_cbn.runtime.bundle import load_bundle, sidecar_path
from edge_cbn.runtime.errors import BadInput
from edge_cbn.runtime.state import calibrated_model_path
from edge_cbn.runtime.stream_calibrator import StreamCalibrator
from edge_cbn.stream.options import StreamOptions
from edge_cbn.stream.persistence import Persistence

from .bundle_corpus import STATE_CASES, STATE_SETUP, load_case, load_state
from .harness import run_case

pytestmark = pytest.mark.hardening
NAN_MOMENTS = next(c for c in STATE_CASES if c.name == "noisy-moments-nan")


def _copy(genuine, root):
    for src in (genuine.model, genuine.sidecar, genuine.calib, *genuine.state.parent.iterdir()):
        shutil.copy(src, root / src.name)
    return root / "tiny.tflite", root / genuine.state.name


def test_the_genuine_state_loads_and_resumes_its_calibrated_model(genuine, tmp_path):
    model, state = _copy(genuine, tmp_path)
    assert run_case(load_case, "state", state, model).kind == "loaded"
    resumed = load_state(state, model)
    assert resumed.model_path is not None and resumed.counters == {"frames": 4, "refolds": 2, "calibration_frames": 4}
    assert all(np.isfinite(m).all() and (v >= 0).all() for m, v in resumed.stats.values())


def test_a_state_saved_before_refold_was_the_one_word_resumes(genuine, tmp_path):
    """States written while the counters were `refuses` and `cal/since_refuse` resume as they were."""
    model, state = _copy(genuine, tmp_path)
    with np.load(state) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["refuses"] = meta.pop("refolds")
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["cal/since_refuse"] = arrays.pop("cal/since_refold")
    with open(state, "wb") as f:
        np.savez(f, **arrays)
    resumed = load_state(state, model)
    assert resumed.model_path is not None and resumed.counters == {"frames": 4, "refolds": 2, "calibration_frames": 4}
    del arrays["cal/since_refuse"]
    with open(state, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(BadInput, match="since_refold"):
        load_state(state, model)


@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: c.name)
def test_corrupt_state_is_refused_in_one_line(case, genuine, tmp_path, canary):
    model, named = case.build(tmp_path, genuine)
    result = run_case(load_case, "state", named, model)
    assert result.ok_refusal(named), result
    assert not canary.exists(), "a pickled payload ran"


def _persistence(model, state, *, calibrating=True, eta=0.05):
    bundle = load_bundle(model)
    opts = StreamOptions(noise=STATE_SETUP["noise"], eta=eta, seed=STATE_SETUP["seed"], mode=STATE_SETUP["mode"],
                         stages=STATE_SETUP["stages"], refold_every=1, state=str(state))
    calibrator = StreamCalibrator(bundle, **opts.calibrator_options()) if calibrating else None
    return Persistence(bundle, opts, calibrating=calibrating), calibrator


@pytest.mark.parametrize("calibrating", [True, False])
def test_a_bad_state_is_set_aside_with_one_warning(genuine, tmp_path, capsys, calibrating):
    model, state = NAN_MOMENTS.build(tmp_path, genuine)
    bad, files = state.read_bytes(), _trio(state)
    persistence, calibrator = _persistence(model, state, calibrating=calibrating)
    assert persistence.resume(calibrator) is None
    err = capsys.readouterr().err.strip().splitlines()
    aside = [p for p in tmp_path.glob("st.npz.bad-*") if p.name.count(".") == 2]
    assert len(aside) == 1 and aside[0].read_bytes() == bad and not state.exists()
    assert _trio(aside[0])[1:] == files[1:]  # the calibrated model and sidecar beside it, renamed with it
    assert len(err) == 1 and "(NaN or Inf)" in err[0] and f"set aside as {aside[0].name}" in err[0], err
    if calibrator is not None:  # the calibrator was left as it was: fresh
        assert calibrator.stage == 0 and calibrator.noisy[calibrator.bns[0]].count == 0
    persistence.close()


def _trio(state) -> list[bytes | None]:
    """The bytes of a state, its calibrated model and that model's sidecar (None for a missing file)."""
    paths = (state, calibrated_model_path(state), sidecar_path(calibrated_model_path(state)))
    return [p.read_bytes() if p.exists() else None for p in paths]


@pytest.mark.parametrize("calibrating", [True, False])
def test_a_state_of_another_setup_is_kept_under_its_setup(genuine, tmp_path, capsys, calibrating):
    """A calibrating stream will save: the state of another setup and its calibrated model are renamed
    first, byte for byte, to a state that resumes with that setup.  A stream that does not save leaves
    them in place."""
    model, state = _copy(genuine, tmp_path)
    files = _trio(state)
    persistence, calibrator = _persistence(model, state, eta=0.1, calibrating=calibrating)
    assert persistence.resume(calibrator) is None
    err = capsys.readouterr().err
    assert "another setup" in err and "eta 0.05 (now 0.1)" in err
    kept = list(tmp_path.glob("st.npz.setup-relative-eta0.05-seed0-shift-*"))
    kept = [p for p in kept if not p.name.endswith((".tflite", ".cbn.npz"))]
    if not calibrating:
        assert _trio(state) == files and not kept
    else:
        assert len(kept) == 1 and f"kept as {kept[0].name}" in err and not state.exists()
        assert _trio(kept[0]) == files and load_state(kept[0], model).model_path == calibrated_model_path(kept[0])
    assert not list(tmp_path.glob("*.bad-*"))
    persistence.close()


def test_a_state_that_cannot_be_written_is_refused_at_start(genuine, tmp_path):
    model, _ = _copy(genuine, tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BadInput, match="cannot save the calibration state there: .*a-file is not a directory"):
        _persistence(model, tmp_path / "a-file" / "st.npz")
    (tmp_path / "adir.npz").mkdir()
    with pytest.raises(BadInput, match="is a directory"):
        _persistence(model, tmp_path / "adir.npz")
    (tmp_path / "s2.calibrated.tflite").mkdir()
    with pytest.raises(BadInput, match="s2.calibrated.tflite: is a directory"):
        _persistence(model, tmp_path / "s2.npz")
    _persistence(model, tmp_path / "a-file" / "st.npz", calibrating=False)[0].close()  # never saves: no check


def _cli(*args):
    return subprocess.Popen([sys.executable, "-c", "from edge_cbn.cli import main; main()", "stream", *args,
                             "--frames", "3", "--headless", "--quiet", "--noise", "relative", "--eta", "0.05",
                             "--no-sweep", "--stages", "2", "--refold-every", "1", "--calibrate-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EDGE_CBN_DEBUG": ""})


def test_a_restart_with_another_setup_keeps_the_saved_calibration(genuine, tmp_path):
    """The first finding of issue 23: a restart with another --eta and the same --state replaced the state,
    the calibrated model and its sidecar.  They are now kept under their setup's name, byte for byte, and
    the first setup resumes from them."""
    model, _ = _copy(genuine, tmp_path)
    state = tmp_path / "s.npz"

    def stream(eta, frames, path=state):
        done = subprocess.run([sys.executable, "-c", "from edge_cbn.cli import main; main()", "stream", "--model",
                               str(model), "--state", str(path), "--save-interval", "0", "--frames", str(frames),
                               "--headless", "--quiet", "--noise", "relative", "--eta", eta, "--stages", "2",
                               "--refold-every", "1", "--calibrate-every", "1"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])["summary"], done.stderr

    stream("0.05", 60)
    first = _trio(state)
    _, err = stream("0.06", 10)
    kept = [p for p in tmp_path.glob("s.npz.setup-relative-eta0.05-*") if not p.name.endswith((".tflite", ".cbn.npz"))]
    assert len(kept) == 1 and f"kept as {kept[0].name}" in err and _trio(kept[0]) == first
    assert None not in _trio(state) and _trio(state) != first  # the new setup's own files
    summary, _ = stream("0.05", 2, kept[0])
    assert summary["resumed"] and summary["eta"] == 0.05


def test_cli_sets_a_nan_state_aside_and_saves_a_good_one(genuine, tmp_path_factory):
    """The regression of issue 14: NaN moments in a state were refolded and saved again.  Now the stream
    sets the file aside with one warning line, runs fresh and saves a state that loads; an unwritable
    --state is one error line, exit 1 (both runs side by side)."""
    root = tmp_path_factory.mktemp("nan-state")
    model, state = NAN_MOMENTS.build(root, genuine)
    (root / "a-file").write_text("")
    nan_run = _cli("--model", str(model), "--state", str(state))
    unwritable = _cli("--model", str(model), "--state", str(root / "a-file" / "st.npz"))
    out, err = nan_run.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert nan_run.returncode == 0 and len(lines) == 1 and "set aside as st.npz.bad-" in lines[0], err
    assert json.loads(out.strip().splitlines()[-1])["summary"]["resumed"] is False
    resumed = load_state(state, model)  # the new state: valid, finite, its calibrated model beside it
    assert resumed.model_path is not None and resumed.counters["frames"] == 3
    out, err = unwritable.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert unwritable.returncode == 1 and len(lines) == 1 and "a-file is not a directory" in lines[0], err
