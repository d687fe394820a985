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
calibrated model on disk is the one it names (sha1) and its sidecar holds the same statistics, the stream
serves it; otherwise (killed between the writes) the saved statistics are re-fused into the source model,
which gives the same bytes.  A state file that cannot be read, or that belongs to another model, noise
setting or calibration mode, is reported and ignored: the stream starts fresh and replaces it.

`EDGE_CBN_TEST_SLOW_SAVE=SECONDS` (tests only) pauses half-way through writing each file, so a test can
kill the process in the middle of a save.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from .bundle import atomic_write, load_bundle, sidecar_path, write_sidecar
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
                noise_options: dict | None = None) -> dict:
    """What a saved state is valid for: the source model's bytes, the simulated chip and the calibrator
    settings that shape its accumulators."""
    return {"model": bundle.meta.get("model"), "model_sha1": sha1(bundle.model_bytes), "noise": noise,
            "eta": float(eta), "seed": int(seed), "noise_options": dict(sorted((noise_options or {}).items())),
            "mode": mode, "stages": int(stages)}


@dataclasses.dataclass
class Snapshot:
    """Everything one save writes; taken on the streaming thread, written on the saver's."""
    stats: dict            # {bn: (mean, var)} folded into the calibrated model
    calibrator: dict       # StreamCalibrator.state_dict()
    model_bytes: bytes     # the calibrated .tflite
    counters: dict         # frames, refuses, progress, ... (JSON)


@dataclasses.dataclass
class Resumed:
    """A state loaded for resuming."""
    stats: dict
    calibrator: dict
    counters: dict
    model_path: Path | None  # the calibrated model, when it is the one the state names
    note: str = ""           # why model_path is None, if it is


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
        layers = [dataclasses.replace(rec, mean=np.asarray(snap.stats[rec.bn][0], np.float32),
                                      var=np.asarray(snap.stats[rec.bn][1], np.float32))
                  if rec.bn in snap.stats else rec for rec in self.bundle.layers]
        meta = {k: v for k, v in self.bundle.meta.items() if k not in ("layers", "calibration", "format")}
        meta["calibrated"] = {**self.fingerprint, "source": self.bundle.path and self.bundle.path.name,
                              "saved_at": time.time()}
        write_sidecar(self.sidecar_path, meta, layers)
        model = snap.model_bytes
        atomic_write(self.model_path, _slow(lambda f: f.write(model)))
        state_meta = {"format": FORMAT, **self.fingerprint, **snap.counters, "saved_at": time.time(),
                      "calibrated_model": self.model_path.name, "calibrated_sha1": sha1(model)}
        arrays = {"meta": np.array(json.dumps(state_meta))}
        arrays.update({f"cal/{k}": np.asarray(v) for k, v in snap.calibrator.items()})
        for bn, (mean, var) in snap.stats.items():
            arrays[f"stats/{bn}/mean"] = np.asarray(mean, np.float32)
            arrays[f"stats/{bn}/var"] = np.asarray(var, np.float32)
        atomic_write(self.path, _slow(lambda f: np.savez(f, **arrays)))

    # ----------------------------------------------------------------------------------------- load
    def load(self, ignore=()) -> Resumed:
        """The saved state; raises ValueError (with a one-line reason) when it cannot be used.  `ignore`:
        fingerprint keys that need not match."""
        try:
            with np.load(self.path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].item())
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except Exception as e:  # truncated, not an npz, pickled content, bad JSON...
            raise ValueError(f"cannot read it ({type(e).__name__}: {e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"state format {meta.get('format')!r}, this edge-cbn reads {FORMAT}")
        diff = [f"{k} {meta.get(k)!r} (now {v!r})" for k, v in self.fingerprint.items()
                if k not in ignore and meta.get(k) != v]
        if diff:
            raise ValueError("it was saved for another setup: " + ", ".join(diff))
        calibrator = {k[4:]: v for k, v in arrays.items() if k.startswith("cal/")}
        stats = {}
        for rec in self.bundle.layers:
            if rec.bn:
                try:
                    mean, var = arrays[f"stats/{rec.bn}/mean"], arrays[f"stats/{rec.bn}/var"]
                except KeyError:
                    raise ValueError(f"statistics of BN {rec.bn!r} missing") from None
                if mean.shape != np.shape(rec.mean) or var.shape != np.shape(rec.var):
                    raise ValueError(f"statistics of BN {rec.bn!r} have the wrong shape")
                if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)):
                    raise ValueError(f"statistics of BN {rec.bn!r} are not finite")
                stats[rec.bn] = (mean, var)
        counters = {k: meta[k] for k in ("frames", "refuses", "calibration_frames") if k in meta}
        model_path, note = self._check_model(meta, stats)
        return Resumed(stats, calibrator, counters, model_path, note)

    def _check_model(self, meta, stats):
        """(calibrated model path, "") when the model and sidecar on disk match the state, else
        (None, why)."""
        try:
            data = self.model_path.read_bytes()
        except OSError:
            return None, f"{self.model_path.name} missing"
        if sha1(data) != meta.get("calibrated_sha1"):
            return None, f"{self.model_path.name} is not the one the state names (killed while saving?)"
        try:
            bundle = load_bundle(self.model_path, require_sidecar=True)
        except Exception as e:
            return None, f"{self.sidecar_path.name} unreadable ({type(e).__name__})"
        for rec in bundle.layers:
            if rec.bn and not (np.array_equal(rec.mean, stats[rec.bn][0]) and
                               np.array_equal(rec.var, stats[rec.bn][1])):
                return None, f"{self.sidecar_path.name} does not match the state"
        return self.model_path, ""


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
