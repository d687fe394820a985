"""The worker side of a sharded `edge-cbn evaluate TASK` sweep (`parallel_sweep`): what a worker receives
once (`SweepPayload`: the bundle's files as bytes, the harness's settings, an empty scorer) and the units it
runs with the harness's own functions (`labelled`), exactly as one process runs them.

- `Statistics`: a method's BN statistics under one chip: the streaming calibration at batch size 1 on
  LiteRT (`calibrated`, the calibration frames in order, as a board runs them) or Algorithm 1 in Keras
  (`offline_*`, from the model's architecture JSON and weight arrays, `convert.model_transfer`);
- `Shard`: consecutive evaluation samples scored under one chip with one method's statistics; sample i of
  the evaluation set is inference EVAL_FRAME0 + i wherever it runs, so a shard meets the temporal noise
  the whole set meets there.  It returns the scorer's partial state, merged by the driver."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import tempfile
import time
from pathlib import Path

from ...cluster import shared
from ...convert.model_transfer import model_from_spec
from ...runtime.bundle import load_bundle
from ...runtime.processing import Processor
from . import datasets, labelled


@dataclasses.dataclass(frozen=True)
class SweepPayload:
    """What every worker of one sweep receives once."""
    key: str  # identifies the payload (model sha1 and settings): what a worker's built objects are kept by
    files: dict  # {file name: bytes}: X.tflite, X.cbn.npz and X.calib.tflite
    model_file: str
    task: str
    processor_options: dict
    center_crop: float
    noise_states: int
    num_threads: int
    calibration: tuple  # streaming calibration frames, in order (paths)
    cal_options: dict
    scorer: object  # an empty scorer of the task (a detection one without the annotations)
    keras: tuple | None = None  # (architecture JSON, weight arrays) when the sweep has offline methods
    offline_calibration: tuple = ()
    offline_batch: int = 1
    momentum: float = 0.999


@dataclasses.dataclass(frozen=True)
class Setting:
    preset: str
    eta: float
    seed: int
    noise_options: dict

    def astuple(self) -> tuple:
        return self.preset, self.eta, self.seed, tuple(sorted(self.noise_options.items()))


@dataclasses.dataclass(frozen=True)
class Statistics:
    setting: Setting
    method: str
    key: str  # the shard cache key of these statistics
    result: str  # the key of the result they are for

    def __str__(self):
        return f"{self.method} statistics, {self.setting.preset} eta {self.setting.eta:g} seed {self.setting.seed}"


@dataclasses.dataclass(frozen=True)
class Shard:
    setting: Setting
    method: str
    start: int  # index of the first sample in the evaluation set
    samples: tuple  # ((path, truth), ...)
    key: str
    result: str
    stats: dict | None = None  # the method's statistics (None: the bundle's own)
    stats_key: str | None = None

    def __str__(self):
        return (f"{self.method} shard at image {self.start}, {self.setting.preset} eta {self.setting.eta:g} "
                f"seed {self.setting.seed}")


def run_unit(payload: SweepPayload, unit) -> dict:
    """Run one unit in this worker: {"stats": {bn: (mean, var)}} or {"state": the scorer's partial state},
    with the unit's "seconds"."""
    t = time.perf_counter()
    setup = shared.memo("setup", payload.key, lambda: setup_of(payload))
    s = unit.setting
    if isinstance(unit, Statistics):
        if unit.method.startswith("offline_"):
            setup.keras_model = shared.memo("keras", payload.key, lambda: model_from_spec(payload.keras))
        chip = labelled.chip_of(setup, s.preset, s.eta, s.seed, s.noise_options)
        stats = labelled.method_statistics(setup, unit.method, chip, s.preset, s.eta, s.seed, s.noise_options,
                                           lambda n: None)
        return {"stats": stats, "seconds": time.perf_counter() - t}
    noisy = shared.memo("model", (payload.key, s.astuple(), unit.stats_key), lambda: noisy_model(setup, unit))
    scorer = setup.new_scorer()
    samples = [datasets.Sample(Path(path), truth) for path, truth in unit.samples]
    labelled.score_into(scorer, setup, noisy.run, samples, unit.start)
    return {"state": scorer.state(), "seconds": time.perf_counter() - t}


def noisy_model(setup, shard: Shard):
    """The evaluated model of a shard: the bundle under the shard's chip, with its method's statistics."""
    s = shard.setting
    _, noisy = labelled.chip_model(setup, s.preset, s.eta, s.seed, s.noise_options)
    if shard.stats is not None:
        noisy.set_stats(shard.stats)
    return noisy


def setup_of(payload: SweepPayload) -> labelled.Setup:
    """The harness's `Setup` in a worker: the bundle written back to files (the sidecar names its
    calibration variant by file name, read at each calibration) and loaded as a board loads it."""
    folder = model_folder(payload.files)
    bundle = load_bundle(folder / payload.model_file)
    template = payload.scorer
    return labelled.Setup(
        bundle, Processor(bundle, **payload.processor_options), datasets.Dataset(payload.task, "shard", []),
        lambda: copy.deepcopy(template), [Path(p) for p in payload.calibration], cal_options=dict(payload.cal_options),
        center_crop=payload.center_crop, noise_states=payload.noise_states, num_threads=payload.num_threads,
        offline_calibration=[Path(p) for p in payload.offline_calibration], offline_batch=payload.offline_batch,
        momentum=payload.momentum, options=dict(payload.processor_options))


def _holds(path: Path, data: bytes) -> bool:
    """True when `path` is a regular file, not a link, whose content is `data`."""
    try:
        return not path.is_symlink() and path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def model_folder(files: dict) -> Path:
    """A folder holding `files` ({name: bytes}), one per content on this machine, shared by its workers
    and reused by later sweeps of the same model: a worker can be ended at any moment (Ray ends a job's
    workers with it) and leaves nothing behind that the next one would not reuse.  Files are written
    under a temporary name and renamed, so a reader never sees half of one.  The folder's name is
    predictable and anyone may write in the temporary directory: a file already there is used only when
    its content is the payload's, byte for byte, and is written anew otherwise."""
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        digest.update(files[name])
    folder = Path(tempfile.gettempdir()) / "edge-cbn-models" / digest.hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = folder / name
        if not _holds(path, data):
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
    return folder
