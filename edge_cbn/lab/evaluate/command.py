"""Recovery under noise on natural photos, with the device-side code (LiteRT, streaming calibrator at
batch size 1): `edge-cbn evaluate`.

No labelled dataset installs offline, so accuracy is measured as agreement with the clean model: the top-1
class of the noisy model (uncalibrated, and after streaming calibration) against the clean model's top-1
on evaluation crops of the photos scikit-image and scikit-learn ship (a model of task "raw", whose outputs
edge-cbn does not interpret: the cosine similarity of its outputs with the clean model's, `CropCosine`).
Calibration crops come from different random crops (`--split crops`) or from disjoint photos (`--split
photos`); `--split same` calibrates on the evaluation crops themselves, a diagnostic, not a fair result."""
from __future__ import annotations

import json
import time

import click
import numpy as np

from ...cli import LazyGroup
from ...convert import build  # build.build_model looked up when called (a test replaces it)
from ...convert.offline_calibration import offline_statistics
from ...options import (IntList, NoiseSweep, noise_option_flag, noise_options, num_threads_option,
                         noise_states_option, refold_every_option, verbose_option)
from ...runtime.bundle import load_bundle
from ...runtime.device_calibration import DeviceCalibration
from ...runtime.noise import make_noise
from ...runtime.noisy_model import NoisyModel, noise_targets
from ...runtime.processing import flat_outputs, model_input, normalise
from ...runtime.stream_calibrator import DEFAULTS as CAL_DEFAULTS, MODES, SHRINK, SWEEP_SHRINK, shrink_for
from ...stream.agreement import AGREEMENT_METRICS, cosine_similarity
from ...stream.resolve import resolve_model
from ..scenes.photos import PHOTO_SETS, load_photos, random_crops, split_photos
from . import bootstrap
from .report import recovered_share, share_replicates

EVAL_FRAME0 = 1 << 32  # temporal-noise frame indices of evaluation inferences (disjoint from calibration)


def top1(model: NoisyModel, xs: np.ndarray, frame0: int) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 class, its softmax probability) per input."""
    logits = np.stack([model.run(x[None], frame0 + i)[0].reshape(-1) for i, x in enumerate(xs)]).astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p.argmax(axis=1), p.max(axis=1)


class CropAgreement:
    """Agreement (%) of a model's top-1 with the clean model's, on all evaluation crops and on the
    confident ones (clean top-1 probability >= `confident`): an unconfident crop's top-1 flips between
    near-equal classes at the smallest perturbation, so it says little about recovery."""
    metric = AGREEMENT_METRICS["classification"]

    def __init__(self, clean_model: NoisyModel, xs: np.ndarray, confident: float = 0.5):
        self.xs = xs
        self.clean, prob = top1(clean_model, xs, EVAL_FRAME0)
        self.mask = prob >= confident

    def per_crop(self, model: NoisyModel) -> np.ndarray:
        """100 where the model's top-1 is the clean model's, else 0, per evaluation crop."""
        return 100.0 * (top1(model, self.xs, EVAL_FRAME0)[0] == self.clean)

    def __call__(self, model: NoisyModel) -> tuple[float, float]:
        return crop_means(self.per_crop(model), self.mask)

    def legend(self) -> str:
        """The line above the table: how many crops are confident, what the cells hold."""
        return f"{int(self.mask.sum())} of {len(self.xs)} evaluation crops are confident; " \
               "cells: all crops / confident crops"


def flat_outputs_per_input(model: NoisyModel, xs: np.ndarray, frame0: int) -> list[np.ndarray]:
    """Each input's outputs flattened and concatenated (`processing.flat_outputs`), kept as float32: the
    model's own precision, half the memory of float64 (the cosine is computed in float64)."""
    return [flat_outputs(model.run(x[None], frame0 + i)).astype(np.float32) for i, x in enumerate(xs)]


class CropCosine:
    """A raw model's agreement: the mean over the evaluation crops of the cosine similarity (%) of a
    model's outputs with the clean model's (`stream.agreement.cosine_similarity`: every output flattened,
    all concatenated, float64 math; 100 = the same direction).  A raw output carries no confidence, so
    every crop counts: `mask` is all true and the "confident" figure is the same mean.

    Args:
        clean_model: the clean model; its outputs on every crop are kept (crops x output size x 4 bytes).
        xs: the evaluation crops as the model takes them.
    """
    metric = AGREEMENT_METRICS["raw"]

    def __init__(self, clean_model: NoisyModel, xs: np.ndarray):
        self.xs = xs
        self.clean = flat_outputs_per_input(clean_model, xs, EVAL_FRAME0)
        self.mask = np.ones(len(xs), bool)

    def per_crop(self, model: NoisyModel) -> np.ndarray:
        """The cosine similarity (%) of the model's outputs with the clean model's, per evaluation crop."""
        outputs = flat_outputs_per_input(model, self.xs, EVAL_FRAME0)
        return np.array([cosine_similarity(c, o) for c, o in zip(self.clean, outputs)], np.float64)

    def __call__(self, model: NoisyModel) -> tuple[float, float]:
        return crop_means(self.per_crop(model), self.mask)

    def legend(self) -> str:
        """The line above the table: the measure, and that every crop counts."""
        return f"agreement: {self.metric} (%) of the outputs with the clean model's, mean over all {len(self.xs)} " \
               "evaluation crops (a raw output has no confidence: both figures of a cell are this mean)"


def crop_means(values: np.ndarray, mask: np.ndarray, weights: np.ndarray | None = None):
    """(all crops, confident crops) means of per-crop `values`; with `weights` (B, crops), the two as (B,)
    arrays over the bootstrap's resamples of the crops (`bootstrap.resample_weights`)."""
    if weights is None:
        return float(values.mean()), float(values[mask].mean()) if mask.any() else float("nan")
    drawn = weights[:, mask].sum(1)
    confident = np.where(drawn > 0, weights[:, mask] @ values[mask] / np.maximum(drawn, 1), np.nan)
    return weights @ values / len(values), confident


def crop_agreement(bundle, clean_model: NoisyModel, xs: np.ndarray):
    """The agreement measure for `bundle`'s task.

    Args:
        bundle: the evaluated bundle.
        clean_model: its clean model.
        xs: the evaluation crops as the model takes them.

    Returns:
        `CropCosine` for a raw model, else `CropAgreement` (top-1 of the first output).
    """
    if bundle.meta["task"] == "raw":
        return CropCosine(clean_model, xs)
    return CropAgreement(clean_model, xs)


def evaluate_setting(bundle, preset, eta, seed, cal_x, agreement: CropAgreement | CropCosine, *, checkpoints,
                     num_threads=None, noise_states=8, keras_model=None, keras_cal_x=None, noise_options=None,
                     static_calibration=False, offline_batch_size=32, **calibrator_options) -> dict:
    """One noise setting: agreement (`crop_agreement`: top-1, or a raw model's cosine) uncalibrated, after
    streaming calibration at each checkpoint and,
    given the Keras model and `keras_cal_x` (the calibration frames normalised for Keras), after offline
    Algorithm 1 (cumulative and EMA 0.999); keys `X` (all crops) and `X_confident`.  `noise_options`:
    make_noise keywords; `static_calibration`: calibrate on the same chip with its temporal factor held
    at its mean (only a simulation can; a diagnostic of what per-frame noise costs the calibration).
    "resampled" holds each figure on the bootstrap's resamples of the crops (for `seed_means`' intervals)."""
    noise_options = noise_options or {}
    chip = make_noise(preset, eta, seed, **noise_options).instantiate(noise_targets(bundle))
    cal_chip = make_noise(preset, eta, seed, temporal=False, **noise_options).instantiate(
        noise_targets(bundle)) if static_calibration else chip
    noisy = NoisyModel(bundle, chip, num_threads=num_threads, noise_states=noise_states, seed=seed)
    row = {"preset": preset, "eta": eta, "seed": seed, "resampled": {}}
    weights = bootstrap.resample_weights(len(agreement.xs))

    def record(key):
        values = agreement.per_crop(noisy)
        row[key], row[key + "_confident"] = crop_means(values, agreement.mask)
        row["resampled"][key], row["resampled"][key + "_confident"] = crop_means(values, agreement.mask, weights)

    record("uncalibrated")

    calibration = DeviceCalibration(bundle, cal_chip, num_threads=num_threads, **calibrator_options)

    def check(frames):
        if frames in checkpoints:
            noisy.set_stats(calibration.statistics())
            record(f"calibrated@{frames}")

    calibration.calibrate(cal_x[:, None], on_frame=check)
    if keras_model is not None:
        for estimator in ("cumulative", "ema"):
            noisy.set_stats(offline_statistics(keras_model, preset, eta, seed, keras_cal_x, estimator=estimator,
                                               batch_size=offline_batch_size, noise_options=noise_options))
            record(f"offline_{estimator}")
    return row


def crops(bundle, split: str, n_cal: int, n_eval: int, seed: int = 0, scale=(0.15, 1.0), photos: str = "all"):
    """(calibration crops, evaluation crops) as RGB uint8 at the model's input size; `scale`: the crop
    side as a fraction of the photo's shorter side (see `photos.random_crops`); `photos`: the photo set
    (`photos.PHOTO_SETS`)."""
    photos = load_photos(photos)
    size = bundle.meta["input_size"][0]
    cal_photos, eval_photos = split_photos(photos) if split == "photos" else (photos, photos)
    ev, _ = random_crops(eval_photos, n_eval, size, seed=2000 + seed, scale=scale)
    if split == "same":  # a diagnostic, not a fair result: calibrate on the evaluation crops
        return ev[np.arange(n_cal) % len(ev)], ev
    cal, _ = random_crops(cal_photos, n_cal, size, seed=1000 + seed, scale=scale)
    return cal, ev


def parse_crop_scale(text: str) -> tuple[float, float]:
    """`LO,HI` of --crop-scale, checked."""
    try:
        scale = tuple(float(v) for v in text.split(","))
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected LO,HI with 0 < LO <= HI <= 1", param_hint="--crop-scale") from None
    return scale


def sweep(bundle, settings, seeds, cal_x, agreement, cols, **setting_options) -> list[dict]:
    """Every (preset, eta, seed) of the sweep, one table row printed as each finishes."""
    rows = []
    click.echo(f"{'preset':<13} {'eta':>5} {'seed':>4} " + " ".join(f"{c:>15}" for c in cols))
    noise_options = setting_options.pop("noise_options")
    for preset, etas in settings:
        for eta in etas:
            for seed in seeds:
                t = time.perf_counter()
                row = evaluate_setting(bundle, preset, eta, seed, cal_x, agreement,
                                       noise_options=noise_options[preset], **setting_options)
                row["seconds"] = round(time.perf_counter() - t, 1)
                rows.append(row)
                cells = [f"{row[c]:.0f}/{row[c + '_confident']:.0f}" for c in cols]
                click.echo(f"{preset:<13} {eta:>5.3g} {seed:>4} " + " ".join(f"{c:>15}" for c in cells))
    return rows


def seed_means(rows: list[dict], cols: list[str]) -> list[dict]:
    """Per (preset, eta): the mean over seeds of every column (all crops and confident), and for each
    calibration column the share of the lost agreement it wins back, (column - uncalibrated) /
    (100 - uncalibrated) in %, from those means (`report.recovered_share`); each with `_lo` / `_hi`, its 95 %
    interval over the crops and the chips (`bootstrap`) when the rows kept their resamples."""
    out = []
    for key in dict.fromkeys((r["preset"], r["eta"]) for r in rows):
        group = [r for r in rows if (r["preset"], r["eta"]) == key]
        mean = {k: float(np.mean([r[k] for r in group])) for c in cols for k in (c, c + "_confident")}
        replicates = {k: bootstrap.cell_replicates([r["resampled"][k] for r in group]) for k in mean
                      if all(k in r.get("resampled", {}) for r in group)}
        for k in list(mean):
            mean[k + "_lo"], mean[k + "_hi"] = bootstrap.interval(replicates.get(k))
        for c in cols[1:]:
            for suffix in ("", "_confident"):  # the clean model agrees with itself on every crop: 100
                u, k = "uncalibrated" + suffix, c + suffix
                mean[k + "_recovered"] = recovered_share(100.0, mean[u], mean[k])
                shares = share_replicates(100.0, replicates[u], replicates[k]) if k in replicates else None
                mean[k + "_recovered_lo"], mean[k + "_recovered_hi"] = bootstrap.interval(
                    shares if mean[k + "_recovered"] is not None else None)
        out.append({"preset": key[0], "eta": key[1], "seeds": [r["seed"] for r in group], **mean})
    return out


def print_seed_means(means: list[dict], cols: list[str]) -> None:
    """The means table: cells `all/confident`, and `(recovered all/confident %)` after each calibration
    column; then the same cells' 95 % intervals over crops and chips."""
    def share(v):
        return "–" if v is None else f"{v:.0f}"

    def span(m, k):
        return "–" if m.get(k + "_lo") is None else f"{m[k + '_lo']:.0f}..{m[k + '_hi']:.0f}"

    click.echo("mean over seeds; after each calibration column the share of the lost agreement it recovers (%)")
    for m in means:
        cells = [f"{m['uncalibrated']:.1f}/{m['uncalibrated_confident']:.1f}"] + [
            f"{m[c]:.1f}/{m[c + '_confident']:.1f} ({share(m[c + '_recovered'])}/{share(m[c + '_confident_recovered'])})"
            for c in cols[1:]]
        click.echo(f"{m['preset']:<13} {m['eta']:>5.3g} mean " + " ".join(f"{c:>15}" for c in cells))
    click.echo(f"the same cells' {bootstrap.method_title()}")
    for m in means:
        cells = [f"{span(m, 'uncalibrated')}/{span(m, 'uncalibrated_confident')}"] + [
            f"{span(m, c)}/{span(m, c + '_confident')} ({span(m, c + '_recovered')}/{span(m, c + '_confident_recovered')})"
            for c in cols[1:]]
        click.echo(f"{m['preset']:<13} {m['eta']:>5.3g} 95 % " + " ".join(f"{c:>15}" for c in cells))


def calibrator_flags():
    """The streaming calibrator's flags (`--mode`, `--window`, `--refold-every`, `--stages`, `--shrink`,
    `--power`), defaults from `StreamCalibrator`; shared by `evaluate` and `evaluate TASK`."""
    decorators = [
        click.option("--mode", type=click.Choice(MODES), default=CAL_DEFAULTS["mode"], show_default=True),
        click.option("--window", type=click.FloatRange(1), default=CAL_DEFAULTS["window"], show_default=True,
                     help="Moments window (frames)."),
        refold_every_option(CAL_DEFAULTS["refold_every"], "Frames per warm-up stage / between refolds."),
        click.option("--stages", type=click.IntRange(1), default=CAL_DEFAULTS["stages"], show_default=True,
                     help="Warm-up stages (capped at the number of BN layers: one layer per stage)."),
        click.option("--shrink", type=click.FloatRange(0), default=None,
                     help=f"Shift mode: pseudo-frames of the source statistics mixed into the moments  [default: "
                          f"{SHRINK:g}, {SWEEP_SHRINK:g} with --sweep]"),
        click.option("--power", type=float, default=CAL_DEFAULTS["power"], show_default=True,
                     help="Shift mode: a = (noisy var / clean var)^power (0.5: moment matching, 1: Wiener)."),
    ]

    def wrap(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return wrap


@click.group("evaluate", cls=LazyGroup, invoke_without_command=True, lazy={
    "classification": "edge_cbn.lab.evaluate.tasks:classification",
    "detection": "edge_cbn.lab.evaluate.tasks:detection",
    "segmentation": "edge_cbn.lab.evaluate.tasks:segmentation",
})
@click.option("--model", default=None, help="Registered name or exported .tflite (default: efficientnet_lite0).")
@click.option("--noise", "settings", type=NoiseSweep(), multiple=True, show_default=True,
              default=("relative:0.02,0.05,0.1", "paper:0.1,0.3", "additive-max:0.02,0.05"),
              help="PRESET:ETA[,ETA…], repeatable.")
@click.option("--seeds", type=IntList(0), default="0", show_default=True, help="Comma-separated chip seeds.")
@noise_option_flag("Override an option of every --noise preset, repeatable, e.g. t_granularity=weight "
                   "(docs/NOISE.md).")
@calibrator_flags()
@noise_states_option(8, "Temporal noise states of the evaluated noisy models (0: a fresh draw and interpreter "
                        "every inference); calibration always draws afresh per frame, as the stream does.",
                     old="--pool")
@click.option("--cal-frames", type=click.IntRange(1), default=192, show_default=True)
@click.option("--eval-crops", type=click.IntRange(1), default=256, show_default=True)
@click.option("--checkpoints", type=IntList(1), default="16,32,64,128,192", show_default=True,
              help="Calibration frame counts at which to evaluate.")
@click.option("--split", type=click.Choice(["crops", "photos", "same"]), default="crops", show_default=True,
              help="Calibration crops from other random crops of the same photos, or from disjoint photos; "
                   "`same`: the evaluation crops themselves (cycled), a diagnostic, not a fair result.")
@click.option("--photos", "photo_set", type=click.Choice(PHOTO_SETS), default="all", show_default=True,
              help="all: the 19 sample photos, including greyscale textures, text, microscopy and astronomy; "
                   "natural: the 7 colour photographs of everyday scenes and objects.")
@click.option("--crop-scale", default="0.15,1", show_default=True,
              help="LO,HI: crop side as a fraction of the photo's shorter side, drawn uniformly in area "
                   "(small crops are textures and details, large ones whole scenes).")
@click.option("--static-calibration", is_flag=True,
              help="Diagnostic: calibrate with the chip's temporal noise held at its mean (evaluation keeps it), "
                   "which only a simulation can do; shows what per-frame noise costs the calibration.")
@click.option("--offline", is_flag=True,
              help="Also run the paper's offline Algorithm 1 in Keras (cumulative and EMA 0.999, batches of "
                   "--batch-size) on the same calibration frames, for comparison (needs TensorFlow and a registered "
                   "model).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="--offline: Algorithm 1's batch size (the paper: 256 for ImageNet, 8 for COCO, 1 for VOC).")
@num_threads_option()
@click.option("--sweep", "sweep_variant", is_flag=True,
              help="Calibrate through the sweep variant, every BN layer from each frame, as `edge-cbn stream` does "
                   "by default (shift mode; the tables in docs/RESULTS.md are depth first).")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@verbose_option()
@click.pass_context
def main(ctx, model, settings, seeds, noise_option, mode, window, refold_every, stages, shrink, power, noise_states, cal_frames,
         eval_crops, checkpoints, split, photo_set, crop_scale, static_calibration, offline, batch_size, num_threads,
         sweep_variant, json_out):
    """Agreement (%) of the noisy model's top-1 with the clean model's (on all evaluation crops and on
    the confident ones, clean top-1 probability >= 0.5; a raw model: the mean cosine similarity of the
    outputs, every crop counted), uncalibrated and after streaming batch-size-1 calibration on LiteRT,
    for each noise setting; ends with one JSON line.  The proxy for when no labelled
    data is at hand; with a dataset, `edge-cbn evaluate classification|detection|segmentation` measures
    the paper's metrics (top-1, mAP@0.5, mIoU) on the same device path."""
    if ctx.invoked_subcommand is not None:  # the group's own options belong to this mode only
        given = [p.opts[0] for p in ctx.command.params if p.name != "verbose"
                 and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)} given before `{ctx.invoked_subcommand}`: the options of "
                                   f"`edge-cbn evaluate {ctx.invoked_subcommand}` go after it (see its --help)")
        return
    bundle = load_bundle(resolve_model(model, echo=click.echo))
    checkpoints = tuple(c for c in checkpoints if c <= cal_frames) or (cal_frames,)
    scale = parse_crop_scale(crop_scale)
    options_by_preset = {preset: noise_options(preset, noise_option) for preset, _ in settings}
    cal_rgb, eval_rgb = crops(bundle, split, cal_frames, eval_crops, scale=scale, photos=photo_set)
    cal_x, eval_x = model_input(cal_rgb, bundle), model_input(eval_rgb, bundle)
    agreement = crop_agreement(bundle, NoisyModel(bundle, None, num_threads=num_threads), eval_x)
    options = dict(mode=mode, window=window, refold_every=refold_every, stages=stages,
                   shrink=shrink_for(shrink, sweep_variant), power=power)
    if sweep_variant:
        if mode != "shift" or not bundle.can_sweep:
            raise click.UsageError("--sweep: " + (f"calibrates in --mode shift only, not {mode}" if mode != "shift"
                                                  else f"{bundle.path.name} has no sweep variant (re-export it)"))
        options["sweep"] = True
    keras_model = keras_cal_x = None
    if offline:
        keras_model = build.build_model(bundle.meta["model"])[1]
        keras_cal_x = normalise(cal_rgb, bundle.meta["preprocess"])
    cols = ["uncalibrated"] + [f"calibrated@{c}" for c in checkpoints] + (
        ["offline_cumulative", "offline_ema"] if offline else [])
    click.echo(agreement.legend())
    rows = sweep(bundle, settings, list(seeds), cal_x, agreement, cols,
                 checkpoints=checkpoints, num_threads=num_threads, noise_states=noise_states, keras_model=keras_model,
                 keras_cal_x=keras_cal_x, noise_options=options_by_preset, static_calibration=static_calibration,
                 offline_batch_size=batch_size,
                 **options)
    means = seed_means(rows, cols)
    print_seed_means(means, cols)
    result = {"evaluate": "agreement", "agreement_metric": agreement.metric, "model": bundle.meta["model"],
              "noise_options": list(noise_option),
              "static_calibration": static_calibration, **options,
              **({"offline_batch_size": batch_size} if offline else {}), "noise_states": noise_states, "split": split, "photos": photo_set,
              "crop_scale": list(scale), "cal_frames": cal_frames, "eval_crops": eval_crops, "confident_crops": int(agreement.mask.sum()),
              "rows": [{k: v for k, v in r.items() if k != "resampled"} for r in rows], "means": means}
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=1)
    click.echo(json.dumps(result))
