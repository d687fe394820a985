"""`edge-cbn evaluate classification|detection|segmentation`: the paper's Tables 1-3 on a labelled dataset,
on the device path.

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

from ...options import NoiseSweep, model_option, noise_option_flag, noise_options, num_threads_option, verbose_option
from ...runtime.bundle import load_bundle, sidecar_path
from ...runtime.device_calibration import DeviceCalibration
from ...runtime.errors import BadInput
from ...runtime.noise import make_noise
from ...runtime.noisy_model import NoisyModel, noise_targets
from ...runtime.processing import Processor, normalise
from . import datasets, metrics, report
from .command import EVAL_FRAME0, calibrator_flags

METHODS = ("original", "calibrated", "offline_ema", "offline_cumulative")
CAL_OPTIONS = ("mode", "window", "refuse_every", "stages", "shrink", "power")  # the streaming calibrator's flags
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
    pool: int = 8
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
    """The task's metrics of `run` over the evaluation samples; sample i is inference EVAL_FRAME0 + i, so
    every method meets the same temporal noise."""
    scorer = setup.new_scorer()
    score_into(scorer, setup, run, setup.dataset.samples, 0, progress)
    return scorer.result()


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
    from ...convert.offline_calibration import offline_statistics as algorithm_1

    return algorithm_1(setup.keras_model, preset, eta, seed, KerasInputs(setup, progress), estimator=estimator,
                       batch_size=setup.offline_batch, momentum=setup.momentum, noise_options=noise_options)


def chip_of(setup: Setup, preset, eta, seed, noise_options):
    """The chip of one seed at one noise setting, over the bundle's layers."""
    return make_noise(preset, eta, seed, **noise_options).instantiate(noise_targets(setup.bundle))


def chip_model(setup: Setup, preset, eta, seed, noise_options) -> tuple:
    """(chip, `NoisyModel` of the bundle under it)."""
    chip = chip_of(setup, preset, eta, seed, noise_options)
    return chip, NoisyModel(setup.bundle, chip, num_threads=setup.num_threads, pool=setup.pool, seed=seed)


def method_statistics(setup: Setup, method, chip, preset, eta, seed, noise_options, progress) -> dict | None:
    """The BN statistics `method` evaluates with under `chip` (None for `original`: the bundle's own)."""
    if method == "calibrated":
        return streaming_statistics(setup, chip, seed, progress)
    if method.startswith("offline_"):
        return offline_statistics(setup, preset, eta, seed, noise_options, method.split("_", 1)[1], progress)
    return None


def evaluate_setting(setup: Setup, preset, eta, seed, noise_options, methods, progress):
    """Yield (method, metrics, seconds) for each of `methods` (in `METHODS` order) under one chip: `original` is
    scored before any statistics are refolded; each calibration then replaces all of them."""
    chip, noisy = chip_model(setup, preset, eta, seed, noise_options)
    for method in (m for m in METHODS if m in methods):
        t = time.perf_counter()
        stats = method_statistics(setup, method, chip, preset, eta, seed, noise_options, progress)
        if stats is not None:
            noisy.set_stats(stats)
        result = score(setup, noisy.run, progress)
        yield method, result, round(time.perf_counter() - t, 2)


def work(setup: Setup, method: str) -> int:
    """Images one method processes (the progress bar's unit)."""
    extra = {"calibrated": len(setup.calibration)}.get(method, 0)
    if method.startswith("offline_"):
        extra = len(setup.offline_calibration)
    return len(setup.dataset.samples) + extra


# ---------------------------------------------------------------------------------------- the cache

class ResultCache:
    """One JSON line per finished (setting, seed, method), appended and flushed as it finishes; a line cut
    short by an interruption is skipped when the cache is read again."""

    def __init__(self, path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.records[record["key"]] = record


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
    return {"model": model_sha1(setup.bundle), "dataset": setup.dataset.fingerprint(),
            "center_crop": setup.center_crop, "pool": setup.pool, **setup.options}


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
                for method, result, seconds in evaluate_setting(setup, preset, eta, seed, noise_options[preset],
                                                                missing, bar.update):
                    cache.put(result_record(keys[method], preset, eta, seed, method, result, seconds))
    return planned_records(setup, plan, cache)


def result_record(key, preset, eta, seed, method, metrics: dict, seconds: float) -> dict:
    """The cache's record of one (setting, seed, method)."""
    return {"key": key, "preset": preset, "eta": eta, "seed": seed, "method": method, "metrics": metrics,
            "seconds": seconds}


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
    if recovered:
        table += "\n" + report.recovery_table(recovered, titles)
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


def sweep_flags(task: str):
    """The flags every task shares: model, noise sweep, seeds, calibration (streaming and offline), output."""
    decorators = [
        model_option(),
        click.option("--noise", "settings", type=NoiseSweep(), multiple=True, default=(PAPER_ETAS[task],),
                     show_default=True, help="PRESET:ETA[,ETA…], repeatable; `paper` is eq. 2 with temporal 20 %, "
                                             "spatial 10 % (docs/NOISE.md)."),
        noise_option_flag("Override an option of every --noise preset, repeatable, e.g. temporal_level=0.2."),
        click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated chip seeds (mean ± std)."),
        click.option("--calib-dir", type=click.Path(exists=True, file_okay=False),
                     help="Calibration images (recursive); never evaluation images."),
        click.option("--calib-list", type=click.Path(exists=True, dir_okay=False),
                     help="Or a split file of calibration images, one path a line (relative to the file)."),
        click.option("--cal-frames", type=click.IntRange(1), default=192, show_default=True,
                     help="Streaming calibration frames (the calibration images shuffled, cycled if fewer)."),
        calibrator_flags(),
        click.option("--pool", type=click.IntRange(0), default=8, show_default=True,
                     help="Temporal noise states of the evaluated model (0: a fresh draw every inference)."),
        click.option("--limit", type=click.IntRange(1), default=None,
                     help="Evaluate a seeded random subset of N images (the same N every run)."),
        click.option("--offline", is_flag=True, help="Also the paper's offline Algorithm 1 in Keras (needs "
                                                     "TensorFlow and a registered model)."),
        click.option("--batch-size", type=click.IntRange(1), default=OFFLINE_BATCH[task], show_default=True,
                     help="--offline: Algorithm 1's batch size (the paper's for this task)."),
        click.option("--offline-frames", type=click.IntRange(1), default=None,
                     help="--offline: calibration images for Algorithm 1 [default: --cal-frames]."),
        click.option("--momentum", type=click.FloatRange(0, 1), default=0.999, show_default=True,
                     help="--offline: Algorithm 1's EMA momentum."),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False),
                     help="--offline: the registered model's weight file (default: the one a package ships)."),
        click.option("--out", "out_dir", default="edge-cbn-evaluate", show_default=True,
                     help="Folder for the table (.md), the CSV, the PNG and the cache."),
        click.option("--cache", type=click.Path(dir_okay=False),
                     help="JSON-lines result cache [default: OUT/cache.jsonl]."),
        click.option("--workers", type=click.IntRange(1), default=None,
                     help="Run the sweep in N local worker processes (LiteRT 1 thread each unless --num-threads); "
                          "the same results as one process (docs/DESIGN.md, 'Sweeps on several processes')."),
        click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
                     help="Run the sweep on a Ray cluster (pip install 'edge-cbn[cluster]'); the data at the same "
                          "paths on every node."),
        click.option("--shard-size", type=click.IntRange(1), default=None,
                     help="--workers/--ray: evaluation images per unit of work [default: 100]."),
        num_threads_option(),
        verbose_option(),
    ]

    def wrap(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return wrap


def offline_model(bundle, weights):
    """The registered Keras model behind `bundle`, with its weights, for --offline."""
    from ...convert.build import MissingWeights, build_model

    try:
        return build_model(bundle.meta["model"], weights, input_size=bundle.input_size[0])[1]
    except (KeyError, MissingWeights) as e:
        raise click.BadParameter(f"{e.args[0]} (--offline needs a registered model)", param_hint="--offline") from None


def make_setup(bundle, dataset, calib_files, kw, *, center_crop=1.0, processor_options=None,
               category_ids=None) -> Setup:
    """The sweep's setup from the shared flags `kw`, the dataset (cut to --limit) and the calibration images
    (refused when they include an evaluation image)."""
    if bundle.meta.get("task") != dataset.task:
        raise click.BadParameter(f"the model is a {bundle.meta.get('task')} model, not {dataset.task}",
                                 param_hint="--model")
    datasets.check_disjoint(calib_files, dataset)
    dataset.samples = datasets.subset(dataset.samples, kw["limit"])
    processor_options = processor_options or {}
    cal_options = {k: kw[k] for k in CAL_OPTIONS}
    return Setup(bundle, Processor(bundle, **processor_options), dataset, scorer_factory(bundle, dataset, category_ids),
                 datasets.calibration_frames(calib_files, kw["cal_frames"]), cal_options=cal_options,
                 center_crop=center_crop, pool=kw["pool"], num_threads=kw["num_threads"],
                 keras_model=offline_model(bundle, kw["weights"]) if kw["offline"] else None,
                 offline_calibration=datasets.calibration_frames(calib_files, kw["offline_frames"] or kw["cal_frames"]),
                 offline_batch=kw["batch_size"], momentum=kw["momentum"], options=dict(processor_options))


def run_task(dataset_of, calib_of, kw, **setup_options) -> dict:
    """One `evaluate TASK` run: model, dataset (`dataset_of()`), calibration images (`calib_of()`), the sweep,
    the report; prints the table and ends with one JSON line, which it returns as a dict."""
    from ...stream.resolve import resolve_model

    seeds = _seeds(kw["seeds"])
    options = {preset: noise_options(preset, kw["noise_option"]) for preset, _ in kw["settings"]}
    bundle = load_bundle(resolve_model(kw["model"], echo=lambda *a, **k: click.echo(*a, err=True)))
    setup = make_setup(bundle, dataset_of(), calib_of(), kw, **setup_options)
    cache = ResultCache(kw["cache"] or Path(kw["out_dir"]) / "cache.jsonl")
    started = time.perf_counter()
    if kw["workers"] or kw["ray_address"]:
        from ...cluster import make_pool
        from . import parallel_sweep

        records = parallel_sweep.sweep(setup, kw["settings"], seeds, options, cache,
                                       make_pool(kw["workers"], kw["ray_address"]),
                                       shard_size=kw["shard_size"] or parallel_sweep.SHARD_SIZE)
    else:
        records = sweep(setup, kw["settings"], seeds, options, cache)
    sweep_s = round(time.perf_counter() - started, 2)
    title = (f"{dataset_title(setup)}; noise {', '.join(p for p, _ in kw['settings'])} "
             f"{' '.join(kw['noise_option']) or '(preset defaults)'}; chip seeds {kw['seeds']}")
    rows, recovered, files, table = write_report(setup, records, kw["out_dir"], title)
    click.echo(table)
    result = {"evaluate": setup.dataset.task, "model": bundle.meta.get("model"), "model_sha1": model_sha1(bundle),
              "dataset": setup.dataset.name, "images": len(setup.dataset.samples),
              "calibration_images": len(set(setup.calibration)), "cal_frames": len(setup.calibration),
              "noise": [f"{p}:{','.join(f'{e:g}' for e in etas)}" for p, etas in kw["settings"]],
              "noise_options": list(kw["noise_option"]), "seeds": seeds, **setup.cal_options,
              **({"offline_batch_size": setup.offline_batch, "momentum": setup.momentum} if kw["offline"] else {}),
              "rows": rows, "recovery": recovered, "records": [{k: v for k, v in r.items() if k != "key"} for r in records], "files": files,
              "sweep_s": sweep_s}
    click.echo(json.dumps(result))
    return result


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers", param_hint="--seeds") from None


def dataset_title(setup: Setup) -> str:
    return (f"{setup.dataset.task}: {setup.bundle.meta.get('model')} on {setup.dataset.name} "
            f"({len(setup.dataset.samples)} images), calibration on {len(set(setup.calibration))} other images")


@click.command("classification")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="ImageNet-style folder <wnid>/*.JPEG (any subset of the 1000 classes), or the images of --labels.")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV of file,class (a class index or a wnid), files relative to --data.")
@click.option("--center-crop", type=click.FloatRange(0, 1, min_open=True), default=0.875, show_default=True,
              help="Central square of this fraction of the shorter side, then resized (0.875 = 224 of 256); 1: "
                   "the whole image, squashed.")
@sweep_flags("classification")
def classification(data, labels_csv, center_crop, **kw):
    """Top-1 and top-5 accuracy (%) per noise level: original, streaming-calibrated on LiteRT (and with
    --offline the paper's Algorithm 1), mean ± std over chip seeds; the paper's Table 1."""
    run_task(lambda: datasets.class_csv(data, labels_csv) if labels_csv else datasets.class_folder(data),
             lambda: datasets.calibration_images(calib_dir=kw["calib_dir"], calib_list=kw["calib_list"]), kw,
             center_crop=center_crop)


@click.command("detection")
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False),
              help="COCO instances_*.json.")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="The folder of the annotation file's images.")
@click.option("--category-ids", default=None,
              help="Comma-separated COCO category ids, one per model class in class order [default: matched by "
                   "name with the annotation file's categories].")
@click.option("--conf-threshold", type=click.FloatRange(0, 1), default=DETECTION_THRESHOLDS["conf_threshold"],
              show_default=True, help="Detections kept before NMS (low, as for any mAP).")
@click.option("--iou-threshold", type=click.FloatRange(0, 1), default=DETECTION_THRESHOLDS["iou_threshold"],
              show_default=True, help="NMS IoU.")
@sweep_flags("detection")
def detection(annotations, images, category_ids, conf_threshold, iou_threshold, **kw):
    """COCO mAP@0.5 and mAR@0.5 (%, pycocotools) per noise level: original, streaming-calibrated on LiteRT
    (and with --offline the paper's Algorithm 1), mean ± std over chip seeds; the paper's Table 2."""
    ids = None
    if category_ids:
        try:
            ids = [int(c) for c in category_ids.split(",")]
        except ValueError:
            raise click.BadParameter(f"{category_ids!r}: expected integers", param_hint="--category-ids") from None
    run_task(lambda: datasets.coco_detection(annotations, images),
             lambda: datasets.calibration_images(calib_dir=kw["calib_dir"], calib_list=kw["calib_list"]), kw,
             processor_options={"conf_threshold": conf_threshold, "iou_threshold": iou_threshold}, category_ids=ids)


@click.command("segmentation")
@click.option("--voc-root", required=True, type=click.Path(exists=True, file_okay=False),
              help="VOC2012 layout: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/.")
@click.option("--split", default="val", show_default=True, help="The split to evaluate.")
@click.option("--calib-split", default=None,
              help="The VOC split to calibrate on [default: train, unless --calib-dir or --calib-list].")
@sweep_flags("segmentation")
def segmentation(voc_root, split, calib_split, **kw):
    """mIoU and pixel accuracy (%, one confusion matrix over the split, label 255 ignored) per noise level:
    original, streaming-calibrated on LiteRT (and with --offline the paper's Algorithm 1), mean ± std over
    chip seeds; the paper's Table 3."""
    if not (calib_split or kw["calib_dir"] or kw["calib_list"]):
        calib_split = "train"
    run_task(lambda: datasets.voc_segmentation(voc_root, split),
             lambda: datasets.calibration_images(calib_dir=kw["calib_dir"], calib_list=kw["calib_list"],
                                                 voc_root=voc_root, calib_split=calib_split), kw)
