"""`edge-cbn evaluate classification|detection|segmentation`: the commands of the labelled sweep.  Each
reads its dataset and calibration images, builds the `labelled.Setup`, runs the sweep (in this process,
or as units on workers through `parallel_sweep`) and writes the report."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ...cluster import make_pool
from ...convert.build import MissingWeights, build_model
from ...options import (IntList, NoiseSweep, max_image_pixels_option, model_option, noise_option_flag, noise_options,
                        noise_states_option, num_threads_option, verbose_option)
from ...runtime.bundle import load_bundle
from ...runtime.processing import Processor
from ...runtime.stream_calibrator import shrink_for
from ...stream.resolve import resolve_model
from . import datasets, metrics, parallel_sweep, report
from .command import calibrator_flags
from .labelled import (CAL_OPTIONS, DETECTION_THRESHOLDS, OFFLINE_BATCH, PAPER_ETAS, ResultCache, Setup, model_sha1,
                       scorer_factory, sweep, write_report)


def sweep_flags(task: str):
    """The flags every task shares: model, noise sweep, seeds, calibration (streaming and offline), output."""
    decorators = [
        model_option(),
        click.option("--noise", "settings", type=NoiseSweep(), multiple=True, default=(PAPER_ETAS[task],),
                     show_default=True, help="PRESET:ETA[,ETA…], repeatable; `paper` is eq. 2 with temporal 20 %, "
                                             "spatial 10 % (docs/NOISE.md)."),
        noise_option_flag("Override an option of every --noise preset, repeatable, e.g. temporal_level=0.2."),
        click.option("--seeds", type=IntList(0), default="0,1,2", show_default=True,
                     help="Comma-separated chip seeds (cells: their mean, with a 95 % interval over images and chips)."),
        click.option("--calib-dir", type=click.Path(exists=True, file_okay=False),
                     help="Calibration images (recursive); never evaluation images."),
        click.option("--calib-list", type=click.Path(exists=True, dir_okay=False),
                     help="Or a split file of calibration images, one path a line (relative to the file)."),
        click.option("--cal-frames", type=click.IntRange(1), default=192, show_default=True,
                     help="Streaming calibration frames (the calibration images shuffled, cycled if fewer)."),
        calibrator_flags(),
        noise_states_option(8, "Temporal noise states of the evaluated model (0: a fresh draw every inference).",
                            old="--pool"),
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
                     help="Folder for the table (.md), the CSV, the PNG, the JSON (every result with its bootstrap "
                     "resamples; tools/goal_table.py reads it) and the cache."),
        click.option("--cache", type=click.Path(dir_okay=False),
                     help="JSON-lines result cache [default: OUT/cache.jsonl]."),
        click.option("--no-cache", is_flag=True,
                     help="Compute every result again instead of reading finished ones back from the cache (the "
                          "new results are still written to it)."),
        click.option("--workers", type=click.IntRange(1), default=None,
                     help="Run the sweep in N local worker processes (LiteRT 1 thread each unless --num-threads); "
                          "the same results as one process (docs/DESIGN.md, 'Sweeps on several processes')."),
        click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
                     help="Run the sweep on a Ray cluster (pip install 'edge-cbn[cluster]'); the data at the same "
                          "paths on every node."),
        click.option("--shard-size", type=click.IntRange(1), default=None,
                     help="--workers/--ray: evaluation images per unit of work [default: 100]."),
        num_threads_option(),
        max_image_pixels_option(),
        verbose_option(),
    ]

    def wrap(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return wrap


def offline_model(bundle, weights):
    """The registered Keras model behind `bundle`, with its weights, for --offline."""
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
    cal_options = {**{k: kw[k] for k in CAL_OPTIONS}, "shrink": shrink_for(kw["shrink"], sweep=False)}
    return Setup(bundle, Processor(bundle, **processor_options), dataset, scorer_factory(bundle, dataset, category_ids),
                 datasets.calibration_frames(calib_files, kw["cal_frames"]), cal_options=cal_options,
                 center_crop=center_crop, noise_states=kw["noise_states"], num_threads=kw["num_threads"],
                 keras_model=offline_model(bundle, kw["weights"]) if kw["offline"] else None,
                 offline_calibration=datasets.calibration_frames(calib_files, kw["offline_frames"] or kw["cal_frames"]),
                 offline_batch=kw["batch_size"], momentum=kw["momentum"], options=dict(processor_options))


def run_task(dataset_of, calib_of, kw, **setup_options) -> dict:
    """One `evaluate TASK` run: model, dataset (`dataset_of(bundle)`), calibration images (`calib_of()`), the sweep,
    the report; prints the table and ends with one JSON line, which it returns as a dict."""
    seeds = list(kw["seeds"])
    options = {preset: noise_options(preset, kw["noise_option"]) for preset, _ in kw["settings"]}
    bundle = load_bundle(resolve_model(kw["model"], echo=lambda *a, **k: click.echo(*a, err=True)))
    setup = make_setup(bundle, dataset_of(bundle), calib_of(), kw, **setup_options)
    cache = ResultCache(kw["cache"] or Path(kw["out_dir"]) / "cache.jsonl", read=not kw["no_cache"])
    started = time.perf_counter()
    if kw["workers"] or kw["ray_address"]:
        records = parallel_sweep.sweep(setup, kw["settings"], seeds, options, cache,
                                       make_pool(kw["workers"], kw["ray_address"]),
                                       shard_size=kw["shard_size"] or parallel_sweep.SHARD_SIZE)
    else:
        records = sweep(setup, kw["settings"], seeds, options, cache)
    sweep_s = round(time.perf_counter() - started, 2)
    say_what_came_from_the_cache(cache, len(records))
    title = (f"{dataset_title(setup)}; noise {', '.join(p for p, _ in kw['settings'])} "
             f"{' '.join(kw['noise_option']) or '(preset defaults)'}; chip seeds {','.join(map(str, seeds))}")
    rows, recovered, files, table = write_report(setup, records, kw["out_dir"], title)
    click.echo(table)
    result = {"evaluate": setup.dataset.task, "model": bundle.meta.get("model"), "model_sha1": model_sha1(bundle),
              "dataset": setup.dataset.name, "images": len(setup.dataset.samples),
              "calibration_images": len(set(setup.calibration)), "cal_frames": len(setup.calibration),
              "noise": [f"{p}:{','.join(f'{e:g}' for e in etas)}" for p, etas in kw["settings"]],
              "noise_options": list(kw["noise_option"]), "seeds": seeds, **setup.cal_options,
              **({"offline_batch_size": setup.offline_batch, "momentum": setup.momentum} if kw["offline"] else {}),
              "rows": [{k: v for k, v in r.items() if k != "replicates"} for r in rows], "recovery": recovered,
              "differences": report.differences(rows, metrics.METRICS[setup.dataset.task][0]),
              "records": [{k: v for k, v in r.items() if k not in ("key", "resampled")} for r in records], "files": files,
              "sweep_s": sweep_s, "from_cache": cache.hits, "cache_rejected": cache.rejected}
    files["json"] = str(Path(files["markdown"]).with_suffix(".json"))
    Path(files["json"]).write_text(json.dumps({**result, "records": [{k: v for k, v in r.items() if k != "key"}
                                                                     for r in records]}))
    click.echo(json.dumps(result))
    return result


def say_what_came_from_the_cache(cache: ResultCache, total: int) -> None:
    """A rerun into the same --out reads finished results back instead of computing them: say so, so that
    a fast run is not mistaken for a new measurement."""
    if cache.hits:
        click.echo(f"{cache.hits} of {total} results read back from {cache.path}, not computed in this run "
                   "(another --out, or delete that file, to compute them again)", err=True)
    if cache.rejected:
        click.echo(f"warning: {cache.rejected} line(s) of {cache.path} failed their check (edited, cut short or "
                   "not written here) and were computed again", err=True)


def dataset_title(setup: Setup) -> str:
    return (f"{setup.dataset.task}: {setup.bundle.meta.get('model')} on {setup.dataset.name} "
            f"({len(setup.dataset.samples)} images), calibration on {len(set(setup.calibration))} other images")


@click.command("classification")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="A folder <class>/*.jpg, the classes named as the model's labels (your own model) or ImageNet "
                   "wnids (any subset of the 1000), or the images of --labels.")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV of file,class (a class index or a wnid), files relative to --data.")
@click.option("--center-crop", type=click.FloatRange(0, 1, min_open=True), default=0.875, show_default=True,
              help="Central square of this fraction of the shorter side, then resized (0.875 = 224 of 256); 1: "
                   "the whole image, squashed.")
@sweep_flags("classification")
def classification(data, labels_csv, center_crop, **kw):
    """Top-1 and top-5 accuracy (%) per noise level: original, streaming-calibrated on LiteRT (and with
    --offline the paper's Algorithm 1), mean ± std over chip seeds; the paper's Table 1."""
    run_task(lambda bundle: datasets.class_csv(data, labels_csv) if labels_csv
             else datasets.class_folder(data, bundle.meta.get("labels", ())),
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
    run_task(lambda bundle: datasets.coco_detection(annotations, images),
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
    run_task(lambda bundle: datasets.voc_segmentation(voc_root, split),
             lambda: datasets.calibration_images(calib_dir=kw["calib_dir"], calib_list=kw["calib_list"],
                                                 voc_root=voc_root, calib_split=calib_split), kw)
