"""The labelled sweep behind `edge-cbn evaluate classification|detection|segmentation` (the commands:
`tasks`): the paper's Tables 1-3 on a labelled dataset, on the device path.

Per noise setting (preset, eta) and chip seed, the methods are
- `original`: the exported model under the chip (LiteRT, `runtime.NoisyModel`), BN statistics as trained;
- `calibrated`: the same model after streaming calibration at batch size 1 on LiteRT, the step
  `edge-cbn stream` runs (`runtime.DeviceCalibration`), on `--cal-frames` calibration images;
- with `--offline`, the paper's Algorithm 1 in Keras (`convert.offline_calibration`) at the paper's batch
  size (256 / 8 / 1), EMA with momentum 0.999 (`offline_ema`) and the cumulative average
  (`offline_cumulative`), whose statistics are then folded into the same LiteRT model.
Every method is scored on the same evaluation images with the same per-inference temporal noise.  Each
result is appended to a JSON-lines cache as soon as it exists, keyed by everything it depends on (model
sha1, dataset, setting, seed, method and its options), so an interrupted sweep resumes where it stopped."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

import click
import numpy as np

from ... import __version__
from ...cluster.shard_cache import FolderSecret
from ...convert.offline_calibration import offline_statistics as algorithm_1
from ...runtime.bundle import sidecar_path
from ...runtime.device_calibration import DeviceCalibration
from ...runtime.errors import BadInput
from ...runtime.noise import make_noise
from ...runtime.noisy_model import NoisyModel, noise_targets
from ...runtime.processing import Processor, normalise
from . import datasets, metrics, report
from .command import EVAL_FRAME0

METHODS = ("original", "calibrated", "offline_ema", "offline_cumulative")
CAL_OPTIONS = ("mode", "window", "refold_every", "stages", "shrink", "power")  # the streaming calibrator's flags
OFFLINE_BATCH = {"classification": 256, "detection": 8, "segmentation": 1}  # the paper's, per task
PAPER_ETAS = {"classification": "paper:0,0.02,0.04,0.06,0.08,0.1", "detection": "paper:0,0.05,0.1",
              "segmentation": "paper:0,0.05,0.1"}
DETECTION_THRESHOLDS = {"conf_threshold": 0.005, "iou_threshold": 0.45}  # low confidence, as for any mAP


@dataclasses.dataclass
class Setup:
    """Everything a sweep needs besides the noise settings and seeds."""
    bundle: object
    processor: Processor
    dataset: datasets.Dataset
    new_scorer: Callable[[], object]
    calibration: list[Path]  # the calibration frames, in order (cycled files)
    cal_options: dict = dataclasses.field(default_factory=dict)  # StreamCalibrator keywords
    center_crop: float = 1.0
    noise_states: int = 8
    num_threads: int | None = None
    keras_model: object = None  # --offline: the Keras model with the bundle's weights
    offline_calibration: list[Path] = dataclasses.field(default_factory=list)  # Algorithm 1's frames
    offline_batch: int = 1
    momentum: float = 0.999
    options: dict = dataclasses.field(default_factory=dict)  # what else changes a result (postprocessing)

    @property
    def methods(self) -> tuple:
        return METHODS if self.keras_model is not None else METHODS[:2]


# ------------------------------------------------------------------------------------------- one model

def frame_of(path, center_crop: float = 1.0) -> np.ndarray:
    """The BGR frame the device sees for an image: the image, or its central square of `center_crop` times
    the shorter side (0.875: the usual ImageNet protocol, resize to 256 and centre-crop 224)."""
    bgr = datasets.read_bgr(path)
    if center_crop >= 1:
        return bgr
    h, w = bgr.shape[:2]
    side = max(1, int(round(min(h, w) * center_crop)))
    y, x = (h - side) // 2, (w - side) // 2
    return bgr[y:y + side, x:x + side]


def predict(setup: Setup, run, sample, frame: int):
    """The prediction for one evaluation sample: `Processor` pre- and postprocessing around `run(x, frame)`
    (a model's outputs in Keras order), exactly as a stream frame."""
    x, ctx = setup.processor.preprocess(frame_of(sample.path, setup.center_crop))
    return setup.processor.postprocess(run(x, frame), ctx)


def score(setup: Setup, run, progress=lambda n: None) -> dict:
    """The task's metrics of `run` over the evaluation samples (`scored`)."""
    return scored(setup, run, progress).result()


def scored(setup: Setup, run, progress=lambda n: None):
    """The task's scorer filled with `run`'s predictions on the evaluation samples; sample i is inference
    EVAL_FRAME0 + i, so every method meets the same temporal noise."""
    scorer = setup.new_scorer()
    score_into(scorer, setup, run, setup.dataset.samples, 0, progress)
    return scorer


def score_into(scorer, setup: Setup, run, samples, start: int, progress=lambda n: None) -> None:
    """Add `run`'s predictions on `samples` to `scorer`, the first being evaluation sample `start` (inference
    EVAL_FRAME0 + start): a shard of the evaluation set meets the noise the whole set meets there."""
    for i, sample in enumerate(samples, start):
        scorer.add(sample, predict(setup, run, sample, EVAL_FRAME0 + i))
        progress(1)


def keras_runner(model, preprocess: dict) -> Callable:
    """`run(x, frame)` of a Keras model on the device input `x` (uint8 pixels normalised with `preprocess`,
    as the exported graph does): the reference path the exported model must agree with."""
    def run(x, frame=0):
        out = model(normalise(x, preprocess) if x.dtype == np.uint8 else x, training=False)
        return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
    return run


def keras_input(setup: Setup, path) -> np.ndarray:
    """A calibration image as the Keras model takes it: the device input, normalised when it is pixels."""
    x = setup.processor.preprocess(frame_of(path, setup.center_crop))[0][0]
    return normalise(x, setup.bundle.meta["preprocess"]) if x.dtype == np.uint8 else x.copy()


class KerasInputs:
    """The offline calibration frames as a lazily decoded sequence (`offline_statistics` slices it into
    batches), so a large set never sits in memory whole."""

    def __init__(self, setup: Setup, progress):
        self.setup, self.progress = setup, progress

    def __len__(self):
        return len(self.setup.offline_calibration)

    def __getitem__(self, s: slice) -> np.ndarray:
        batch = np.stack([keras_input(self.setup, f) for f in self.setup.offline_calibration[s]])
        self.progress(len(batch))
        return batch


# ------------------------------------------------------------------------------------- one setting

def streaming_statistics(setup: Setup, chip, seed: int, progress) -> dict:
    """BN statistics after streaming batch-size-1 calibration on LiteRT under `chip`: the calibration
    frames one at a time through `DeviceCalibration.step`, as `edge-cbn stream` runs them (frames 0…N-1)."""
    calibration = DeviceCalibration(setup.bundle, chip, num_threads=setup.num_threads, seed=seed,
                                    **setup.cal_options)

    def inputs():
        for path in setup.calibration:
            yield setup.processor.preprocess(frame_of(path, setup.center_crop))[0]
            progress(1)

    return calibration.calibrate(inputs())


def offline_statistics(setup: Setup, preset, eta, seed, noise_options, estimator: str, progress) -> dict:
    """The paper's Algorithm 1 in Keras under the same chip (same seed: the same spatial draws), at
    `setup.offline_batch` images per batch and momentum `setup.momentum` (`estimator` "ema"), or the
    cumulative average ("cumulative")."""
    return algorithm_1(setup.keras_model, preset, eta, seed, KerasInputs(setup, progress), estimator=estimator,
                       batch_size=setup.offline_batch, momentum=setup.momentum, noise_options=noise_options)


def chip_of(setup: Setup, preset, eta, seed, noise_options):
    """The chip of one seed at one noise setting, over the bundle's layers."""
    return make_noise(preset, eta, seed, **noise_options).instantiate(noise_targets(setup.bundle))


def chip_model(setup: Setup, preset, eta, seed, noise_options) -> tuple:
    """(chip, `NoisyModel` of the bundle under it)."""
    chip = chip_of(setup, preset, eta, seed, noise_options)
    return chip, NoisyModel(setup.bundle, chip, num_threads=setup.num_threads, noise_states=setup.noise_states, seed=seed)


def method_statistics(setup: Setup, method, chip, preset, eta, seed, noise_options, progress) -> dict | None:
    """The BN statistics `method` evaluates with under `chip` (None for `original`: the bundle's own)."""
    if method == "calibrated":
        return streaming_statistics(setup, chip, seed, progress)
    if method.startswith("offline_"):
        return offline_statistics(setup, preset, eta, seed, noise_options, method.split("_", 1)[1], progress)
    return None


def evaluate_setting(setup: Setup, preset, eta, seed, noise_options, methods, progress):
    """Yield (method, filled scorer, seconds) for each of `methods` (in `METHODS` order) under one chip:
    `original` is scored before any statistics are refolded; each calibration then replaces all of them."""
    chip, noisy = chip_model(setup, preset, eta, seed, noise_options)
    for method in (m for m in METHODS if m in methods):
        t = time.perf_counter()
        stats = method_statistics(setup, method, chip, preset, eta, seed, noise_options, progress)
        if stats is not None:
            noisy.set_stats(stats)
        scorer = scored(setup, noisy.run, progress)
        yield method, scorer, round(time.perf_counter() - t, 2)


def work(setup: Setup, method: str) -> int:
    """Images one method processes (the progress bar's unit)."""
    extra = {"calibrated": len(setup.calibration)}.get(method, 0)
    if method.startswith("offline_"):
        extra = len(setup.offline_calibration)
    return len(setup.dataset.samples) + extra


# ---------------------------------------------------------------------------------------- the cache

class ResultCache:
    """One JSON line per finished (setting, seed, method), appended and flushed as it finishes, with an
    HMAC under the folder's own secret (`cluster.shard_cache.FolderSecret`): a line cut short by an
    interruption, edited or planted is skipped when the cache is read again (`rejected` counts them) and
    that result is computed again.  `hits` counts the results taken from the file in this run.

    Args:
        path: the JSON-lines file (OUT/cache.jsonl).
        read: False starts empty (`--no-cache`: every result computed again, and appended).
    """

    def __init__(self, path, *, read: bool = True):
        self.path = Path(path)
        self.secret = FolderSecret(self.path.parent)
        self.records: dict[str, dict] = {}
        self.rejected = self.hits = 0
        if read and self.path.is_file():
            for line in self.path.read_bytes().splitlines():
                rec = self._checked(line)
                if rec is None:
                    self.rejected += 1
                else:
                    self.records[rec["key"]] = rec
        self._read = set(self.records)

    def _checked(self, line: bytes) -> dict | None:
        try:
            entry = json.loads(line)
            record, mac = entry["record"], entry["mac"].encode()
            key = record["key"]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return record if self.secret.holds(key, _canonical(record), mac) else None

    def get(self, key: str) -> dict | None:
        """The finished result of `key`, or None."""
        if key in self._read:
            self._read.discard(key)
            self.hits += 1
        return self.records.get(key)

    def put(self, record: dict) -> None:
        """Append `record` (with its "key")."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mac = self.secret.mac(record["key"], _canonical(record)).decode()
        with open(self.path, "a") as f:
            f.write(json.dumps({"record": record, "mac": mac}) + "\n")
        self.records[record["key"]] = record


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def model_sha1(bundle) -> str:
    """sha1 of the exported model and its sidecar (the BN statistics and kernels noise acts on)."""
    h = hashlib.sha1(bundle.model_bytes)
    side = sidecar_path(bundle.path) if bundle.path is not None else None
    if side is not None and side.is_file():
        h.update(side.read_bytes())
    return h.hexdigest()


def fingerprints(setup: Setup) -> dict:
    """What every cached result of this setup depends on, once per sweep (hashing reads the sidecar and
    the annotation file)."""
    return {"version": __version__, "model": model_sha1(setup.bundle), "dataset": setup.dataset.fingerprint(),
            "center_crop": setup.center_crop, "noise_states": setup.noise_states, **setup.options}


def method_options(setup: Setup, method: str) -> dict:
    if method == "calibrated":
        return {"calibration": [str(p) for p in setup.calibration], **setup.cal_options}
    if method.startswith("offline_"):
        return {"calibration": [str(p) for p in setup.offline_calibration], "batch": setup.offline_batch,
                "momentum": setup.momentum, "keras": getattr(setup.keras_model, "name", "")}
    return {}


def cache_key(common: dict, setup: Setup, preset, eta, noise_options, seed, method) -> str:
    key = {**common, "preset": preset, "eta": eta, "noise_options": noise_options, "seed": seed,
           "method": method, "method_options": method_options(setup, method)}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- the sweep

def sweep_plan(setup: Setup, settings, seeds, noise_options: dict, cache: ResultCache) -> list[tuple]:
    """(preset, eta, seed, {method: cache key}, [methods not in the cache]) per chip of the sweep, in order."""
    common = fingerprints(setup)
    plan = []
    for preset, etas in settings:
        for eta in etas:
            for seed in seeds:
                keys = {m: cache_key(common, setup, preset, eta, noise_options[preset], seed, m)
                        for m in setup.methods}
                plan.append((preset, eta, seed, keys, [m for m in setup.methods if cache.get(keys[m]) is None]))
    return plan


def planned_records(setup: Setup, plan, cache: ResultCache) -> list[dict]:
    """The cached records of a finished plan, in sweep order."""
    return [cache.get(keys[m]) for *_, keys, _ in plan for m in setup.methods]


def sweep(setup: Setup, settings, seeds, noise_options: dict, cache: ResultCache) -> list[dict]:
    """Every (preset, eta, seed, method) of the sweep, from the cache or computed (and cached as each
    finishes), under one progress bar on stderr; the records in sweep order."""
    plan = sweep_plan(setup, settings, seeds, noise_options, cache)
    total = sum(work(setup, m) for *_, missing in plan for m in missing)
    with click.progressbar(length=total, label=f"evaluating ({total} image passes to go)", file=sys.stderr,
                           hidden=total == 0) as bar:
        for preset, eta, seed, keys, missing in plan:
            if missing:
                for method, scorer, seconds in evaluate_setting(setup, preset, eta, seed, noise_options[preset],
                                                                missing, bar.update):
                    cache.put(result_record(keys[method], preset, eta, seed, method, scorer, seconds))
    return planned_records(setup, plan, cache)


def result_record(key, preset, eta, seed, method, scorer, seconds: float) -> dict:
    """The cache's record of one (setting, seed, method) from its filled scorer: the metrics, and the
    metrics on the bootstrap's resamples of the images (`metrics.bootstrap_replicates`)."""
    return {"key": key, "preset": preset, "eta": eta, "seed": seed, "method": method,
            "metrics": scorer.result(), "resampled": metrics.bootstrap_replicates(scorer), "seconds": seconds}


def method_titles(setup: Setup) -> dict:
    return {"original": "original (uncalibrated)",
            "calibrated": f"calibrated: streaming, batch 1, {len(setup.calibration)} frames, LiteRT",
            "offline_ema": f"Algorithm 1: EMA {setup.momentum:g}, batch {setup.offline_batch}, Keras",
            "offline_cumulative": f"Algorithm 1: cumulative, batch {setup.offline_batch}, Keras"}


def write_report(setup: Setup, records: list[dict], out_dir, title: str) -> tuple[list, list, dict, str]:
    """(aggregated rows, recovered shares, {kind: path}, markdown) for the sweep's records:
    `<task>-<model>.md`, `.csv` and `.png` in `out_dir`."""
    task, model = setup.dataset.task, setup.bundle.meta.get("model", "model")
    names = metrics.METRICS[task]
    rows = report.aggregate(records, names, list(METHODS))
    titles = method_titles(setup)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{task}-{model}"
    recovered = report.recovery(rows, names[0])
    table = f"{title}\n\n" + report.markdown_table(rows, names, titles)
    for part in (report.recovery_table(recovered, titles), report.differences_table(report.differences(rows, names[0]), titles)):
        table += "\n" + part if part else ""
    Path(f"{stem}.md").write_text(table)
    files = {"markdown": f"{stem}.md", "csv": str(report.write_csv(rows, names, f"{stem}.csv"))}
    png = report.plot(rows, names, titles, title, f"{stem}.png")
    if png is not None:
        files["png"] = str(png)
    return rows, recovered, files, table


# ------------------------------------------------------------------------------------------ the CLI

def scorer_factory(bundle, dataset: datasets.Dataset, category_ids=None) -> Callable:
    """A fresh scorer of the dataset's task per method, checked against the model's classes."""
    labels = list(bundle.meta.get("labels") or [])
    if dataset.task == "classification":
        top = max(s.truth for s in dataset.samples)
        if labels and top >= len(labels):
            raise BadInput(dataset.name, f"has class index {top} but the model has {len(labels)} classes")
        return metrics.TopK
    if dataset.task == "detection":
        try:
            cats = metrics.category_ids(labels, dataset.coco, category_ids)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--category-ids") from None
        return lambda: metrics.CocoDetection(dataset.coco, cats)
    n = len(labels) or int(NoisyModel(bundle).run(np.zeros((1, *bundle.input_size, 3), np.uint8
                                                           if bundle.raw_input else np.float32))[0].shape[-1])
    return lambda: metrics.Segmentation(n)
