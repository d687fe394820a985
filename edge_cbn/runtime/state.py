"""Persistence of on-device calibration (`edge-cbn stream --state FILE`).  Device side: numpy only.

Three files, each written atomically (`bundle.atomic_write`: temporary file beside it, fsync, rename):

1. `<stem>.calibrated.cbn.npz` — the sidecar of the calibrated model: the source sidecar with the
   calibrated BN statistics in place of the exported ones and without the `calibration` entry (the
   calibration variant belongs to the source model); meta gains `"calibrated": {...}`;
2. `<stem>.calibrated.tflite` — the last good calibrated model: clean weights with the calibrated
   statistics folded in (what `Refolder.refold(stats)` makes of the source model).  Together with (1) it is
   an ordinary exported bundle: `edge-cbn stream --model <stem>.calibrated.tflite` serves it as is;
3. `FILE` (an `.npz`, the commit point, written last): `meta` (JSON: format, what the state is valid for,
   counters, the sha1 of (2)), `cal/...` (`StreamCalibrator.state_dict()`), `stats/<bn>/mean|var`.

A kill at any moment leaves each file either old or new.  On start the state file decides: if the
calibrated model on disk is the one it names (sha1) and its sidecar, loaded and validated like any bundle,
holds the source's layers and the same statistics, the stream serves it; otherwise (killed between the
writes) the saved statistics are refolded into the source model, which gives the same bytes.

Loading checks every array (`StateStore.load`: names, dtypes, shapes = the model's BN channels, finite,
var >= 0, and with a calibrator its accumulators, `StreamCalibrator.check_state_dict`).  Nothing saved is
ever written over: a state saved for another model, noise setting or calibration mode (`OtherSetup`) is
kept under its setup's name, `FILE.setup-<setup>`, and a state that fails validation (`BadInput`) under
`FILE.bad-<time>` (`StateStore.set_aside`), each with its calibrated model and sidecar renamed beside it,
so the three stay a state that `--state FILE.setup-…` resumes with that setup.

`EDGE_CBN_TEST_SLOW_SAVE=SECONDS` (tests only) pauses half-way through writing each file, so a test can
kill the process in the middle of a save.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from .bundle import Bundle, atomic_write, load_bundle, sidecar_path, write_sidecar
from .bundle import sha256 as sha256_of
from .errors import BadInput
from .validation import (ArraySpec, Invalid, check_bn_stats, check_count, one_line, open_npz, read_members,
                         refusing)
from .worker import LatestJobWorker

FORMAT = 1
_SLOW_ENV = "EDGE_CBN_TEST_SLOW_SAVE"


def sha1(data) -> str:
    return hashlib.sha1(data).hexdigest()


def calibrated_model_path(state_path) -> Path:
    """`state.npz` -> `state.calibrated.tflite` (beside the state file)."""
    p = Path(state_path)
    stem = p.name[: -len(".npz")] if p.name.endswith(".npz") else p.name
    return p.with_name(stem + ".calibrated.tflite")


def fingerprint(bundle, *, noise: str, eta: float, seed: int, mode: str, stages: int,
                noise_options: dict | None = None, sweep: bool = False) -> dict:
    """What a saved state is valid for: the source model's bytes, the simulated chip and the calibrator
    settings that shape its accumulators (`sweep`: calibrated through the sweep variant, whose `stages`
    are warm-up frames; a depth-first state's fingerprint is as it was before the sweep)."""
    saved = {"model": bundle.meta.get("model"), "model_sha1": sha1(bundle.model_bytes), "noise": noise,
             "eta": float(eta), "seed": int(seed), "noise_options": dict(sorted((noise_options or {}).items())),
             "mode": mode, "stages": int(stages)}
    return {**saved, "schedule": "sweep"} if sweep else saved


class OtherSetup(BadInput):
    """A readable state saved for another model, noise setting or calibration mode (`saved`: its meta)."""

    def __init__(self, path, reason: str, saved: dict):
        super().__init__(path, reason)
        self.saved = saved


def setup_label(saved: dict) -> str:
    """A file-name-safe label of the setup a state was saved for: noise, eta, seed, mode, model sha1."""
    label = (f"{saved.get('noise')}-eta{saved.get('eta')}-seed{saved.get('seed')}-{saved.get('mode')}-"
             f"{str(saved.get('model_sha1'))[:8]}")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:96]


@dataclasses.dataclass
class Snapshot:
    """Everything one save writes; taken on the streaming thread, written on the saver's."""
    stats: dict            # {bn: (mean, var)} folded into the calibrated model
    calibrator: dict       # StreamCalibrator.state_dict()
    model_bytes: bytes     # the calibrated .tflite
    counters: dict         # frames, refolds, progress, ... (JSON)


@dataclasses.dataclass
class Resumed:
    """A state loaded for resuming."""
    stats: dict
    calibrator: dict
    counters: dict
    model_path: Path | None  # the calibrated model, when it is the one the state names
    note: str = ""           # why model_path is None, if it is
    model_bundle: Bundle | None = None  # the calibrated bundle at model_path, loaded and validated (serve it as is)


def _slow(write):
    """Test hook: write half, pause, write the rest (only with EDGE_CBN_TEST_SLOW_SAVE set)."""
    delay = float(os.environ.get(_SLOW_ENV) or 0)
    if not delay:
        return write

    class Half:
        def __init__(self, f):
            self.f, self.paused = f, False

        def write(self, data):
            data = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
            if not self.paused and len(data) > 1:
                half = len(data) // 2
                self.f.write(data[:half])
                self.f.flush()
                self.paused = True
                time.sleep(delay)
                return half + self.f.write(data[half:])
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    return lambda f: write(Half(f))


def write_calibrated_bundle(bundle, stats: dict, model_bytes: bytes, path, info: dict, *,
                            record_sha256: bool = True) -> Path:
    """Write the calibrated model `path` (`model_bytes`: `bundle` with `stats` refolded) and its sidecar,
    each atomically, sidecar first: an ordinary exported bundle without a calibration variant, whose meta
    records `info` under "calibrated".

    Args:
        record_sha256: record the model's sha256 in the sidecar (checked at load).  The stream's saves do
            not: they rewrite the pair every few seconds, a kill between the two writes would leave a pair
            that fails the check, and the state file's own sha1 of the model decides whether it is used.

    Returns:
        `path`.
    """
    path = Path(path)
    layers = [dataclasses.replace(rec, mean=np.asarray(stats[rec.bn][0], np.float32),
                                  var=np.asarray(stats[rec.bn][1], np.float32))
              if rec.bn in stats else rec for rec in bundle.layers]
    meta = {k: v for k, v in bundle.meta.items() if k not in ("layers", "calibration", "format")}
    meta["calibrated"] = {**info, "source": bundle.path and bundle.path.name, "saved_at": time.time()}
    meta.pop("model_sha256", None)  # the source model's
    if record_sha256:
        meta["model_sha256"] = sha256_of(model_bytes)
    write_sidecar(sidecar_path(path), meta, layers)
    atomic_write(path, _slow(lambda f: f.write(model_bytes)))
    return path


class StateStore:
    """The state file `path` and the calibrated model beside it, for one source `bundle` and setup."""

    def __init__(self, path, bundle, fp: dict):
        self.path = Path(path)
        self.model_path = calibrated_model_path(self.path)
        self.sidecar_path = sidecar_path(self.model_path)
        self.bundle, self.fingerprint = bundle, fp

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files a killed save left behind (`.<name>.*.tmp` of our three files)."""
        gone = []
        for target in (self.path, self.model_path, self.sidecar_path):
            if not target.parent.is_dir():
                continue
            for tmp in target.parent.glob(f".{target.name}.*.tmp"):
                try:
                    tmp.unlink()
                    gone.append(tmp)
                except OSError:
                    pass
        return gone

    # ----------------------------------------------------------------------------------------- save
    def save(self, snap: Snapshot) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        model = snap.model_bytes
        write_calibrated_bundle(self.bundle, snap.stats, model, self.model_path, self.fingerprint,
                                record_sha256=False)
        state_meta = {"format": FORMAT, **self.fingerprint, **snap.counters, "saved_at": time.time(),
                      "calibrated_model": self.model_path.name, "calibrated_sha1": sha1(model)}
        arrays = {"meta": np.array(json.dumps(state_meta))}
        arrays.update({f"cal/{k}": np.asarray(v) for k, v in snap.calibrator.items()})
        for bn, (mean, var) in snap.stats.items():
            arrays[f"stats/{bn}/mean"] = np.asarray(mean, np.float32)
            arrays[f"stats/{bn}/var"] = np.asarray(var, np.float32)
        atomic_write(self.path, _slow(lambda f: np.savez(f, **arrays)))

    # ----------------------------------------------------------------------------------------- load
    def load(self, ignore=(), calibrator=None) -> Resumed:
        """The saved state, every array checked; with `calibrator` (a `StreamCalibrator`) its part is
        checked too and loaded into it, all or nothing.  `ignore`: fingerprint keys that need not match.
        Raises `OtherSetup` for a state of another setup, `BadInput` naming the file when it fails."""
        with refusing(self.path, "not a readable state (.npz)"), open_npz(self.path) as members:
            meta = json.loads(members.text("meta"))
            counters = self._check_meta(meta, ignore)
            unexpected = sorted(n for n in members.names if n != "meta" and not n.startswith(("stats/", "cal/")))
            if unexpected:
                raise Invalid(f"unexpected array {unexpected[0]!r}")
            stats = self._read_stats(members)
            cal = self._read_calibrator(members, calibrator)
            model_bundle, note = self._check_model(meta, stats)
            if calibrator is not None:
                calibrator.load_state_dict(cal)
        return Resumed(stats, cal, counters, None if model_bundle is None else self.model_path, note,
                       model_bundle)

    def _check_meta(self, meta, ignore) -> dict:
        """The state's format and fingerprint (`OtherSetup` when it was saved for another setup); returns
        its counters, each an integer >= 0."""
        if not isinstance(meta, dict):
            raise Invalid("its meta is not a JSON object")
        if meta.get("format") != FORMAT:
            raise Invalid(f"state format {one_line(repr(meta.get('format')), 60)}, this edge-cbn reads {FORMAT}")
        diff = [f"{k} {one_line(repr(meta.get(k)), 60)} (now {v!r})" for k, v in self.fingerprint.items()
                if k not in ignore and meta.get(k) != v]
        if diff:
            raise OtherSetup(self.path, "it was saved for another setup: " + ", ".join(diff), meta)
        if "refuses" in meta:  # the counter's name in states saved before "refold" became the one word for it
            meta.setdefault("refolds", meta["refuses"])
        return {k: check_count(k, meta[k]) for k in ("frames", "refolds", "calibration_frames") if k in meta}

    def _read_stats(self, members) -> dict:
        """{bn: (mean, var)}: float32, one value per channel of the model's BN, finite, var >= 0."""
        bns = {rec.bn: len(rec.mean) for rec in self.bundle.layers if rec.bn}
        specs = {f"{bn}/{k}": ArraySpec("f", ((c,),), (4,)) for bn, c in bns.items() for k in ("mean", "var")}
        arrays = read_members(members, specs, "stats/")
        for bn, channels in bns.items():
            check_bn_stats(bn, arrays[f"{bn}/mean"], arrays[f"{bn}/var"], channels)
        return {bn: (arrays[f"{bn}/mean"], arrays[f"{bn}/var"]) for bn in bns}

    def _read_calibrator(self, members, calibrator) -> dict:
        """The calibrator's arrays (`cal/...`), against `calibrator.state_specs()`.  A stream that does not
        calibrate has no calibrator to check them against: they must still be small (one value per
        channel at most), numbers or text, and finite."""
        if calibrator is not None:
            return read_members(members, calibrator.state_specs(), "cal/")
        shapes = ((),) + tuple({(len(rec.mean),) for rec in self.bundle.layers if rec.bn})
        arrays = {n[4:]: members.array(n, ArraySpec("fiuU", shapes)) for n in sorted(members.names)
                  if n.startswith("cal/")}
        for name, value in arrays.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise Invalid(f"array 'cal/{name}' holds non-finite values (NaN or Inf)")
        return arrays

    def _check_model(self, meta, stats):
        """(calibrated bundle, "") when the model and sidecar on disk match the state, else (None, why).
        The calibrated bundle is loaded and validated like any other."""
        try:
            data = self.model_path.read_bytes()
        except OSError:
            return None, f"{self.model_path.name} missing"
        if sha1(data) != meta.get("calibrated_sha1"):
            return None, f"{self.model_path.name} is not the one the state names (killed while saving?)"
        try:
            bundle = load_bundle(self.model_path, require_sidecar=True)
        except (BadInput, FileNotFoundError) as e:
            return None, f"{self.sidecar_path.name} unusable ({e.reason if isinstance(e, BadInput) else 'missing'})"
        if not _same_layers(bundle, self.bundle) or any(
                rec.bn and not (np.array_equal(rec.mean, stats[rec.bn][0]) and
                                np.array_equal(rec.var, stats[rec.bn][1])) for rec in bundle.layers):
            return None, f"{self.sidecar_path.name} does not match the state"
        return bundle, ""

    # ---------------------------------------------------------------------------------- bad states
    def set_aside(self, tag: str | None = None) -> Path | None:
        """Rename the state file to `FILE.<tag>` (default `bad-<UTC time>`; `-1`, `-2`, … when taken), then
        the calibrated model and sidecar beside it to the names that state has: kept, never resumed nor
        saved over.  Returns the new state path; None when the state cannot be renamed (a read-only
        directory; the next save replaces it then)."""
        tag = tag or "bad-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.{tag}")
        for n in range(1, 100):
            if not any(p.exists() for p in (target, calibrated_model_path(target))):
                break
            target = self.path.with_name(f"{self.path.name}.{tag}-{n}")
        try:
            os.rename(self.path, target)
        except OSError:
            return None
        model = calibrated_model_path(target)
        for old, new in ((self.model_path, model), (self.sidecar_path, sidecar_path(model))):
            try:
                os.rename(old, new)
            except OSError:  # missing (never saved, or killed before it), or not movable: the state alone
                pass         # holds the statistics, and resuming it refolds them
        return target

    def check_writable(self) -> None:
        """`BadInput` (one line, at start) when the state cannot be saved where it points: its directory
        cannot be made or written, or one of its files is a directory."""
        for target in (self.path, self.model_path, self.sidecar_path):
            if target.is_dir():
                raise BadInput(target, "is a directory; the calibration state is saved to a file of this name")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:  # mkdir of a path through a file says "File exists": name the file instead
            why = f"{e.filename} is not a directory" if isinstance(e, FileExistsError) else e.strerror or str(e)
            raise BadInput(self.path, f"cannot save the calibration state there: {why}") from None


def _same_layers(a, b) -> bool:
    """The calibrated bundle `a` holds the source `b`'s layers: names, kinds, buffers, kernels, biases."""
    return len(a.layers) == len(b.layers) and all(
        (x.name, x.kind, x.bn, x.eps, x.w_buffer, x.b_buffer) == (y.name, y.kind, y.bn, y.eps, y.w_buffer, y.b_buffer)
        and np.array_equal(x.kernel, y.kernel) and _equal_or_none(x.bias, y.bias)
        and _equal_or_none(x.gamma, y.gamma) and _equal_or_none(x.beta, y.beta) for x, y in zip(a.layers, b.layers))


def _equal_or_none(x, y) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))


class Saver(LatestJobWorker):
    """Writes snapshots on a background thread so a save never stalls the stream: only the newest
    waiting snapshot is written; `flush` waits until everything submitted is on disk.  Errors go to
    `on_error` and do not stop the stream."""

    def __init__(self, store: StateStore, on_error=None):
        self.store = store
        super().__init__(store.save, name="edge-cbn-saver", on_error=on_error or (lambda e: None))

    @property
    def saves(self) -> int:
        return self.done

    def flush(self, timeout: float | None = None) -> bool:
        return self.wait(timeout)
