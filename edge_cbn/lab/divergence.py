"""`edge-cbn divergence`: the paper's Fig. 1, how far weight noise moves each BatchNorm layer's input
distribution away from the clean one, without and with Calibrated BatchNorm.

What is compared, per BN layer l, on the same evaluation images:
- clean: the model as exported (clean weights, its own BN statistics);
- uncalibrated: the chip's noisy weights, the exported BN statistics;
- calibrated: the same noisy weights (the same per-batch temporal draws) with the BN statistics that
  streaming batch-size-1 calibration on LiteRT (`runtime.DeviceCalibration`, the step `edge-cbn stream`
  runs) found on separate calibration images under the same chip.
BN input activations are needed in full, not only their moments, and the exported model has BN folded
away, so the activations come from the Keras model behind the bundle (its registered architecture
filled with the bundle's own tensors), with the chip's kernels (`Chip.perturb`) and the calibrated
statistics (`moving_mean` / `moving_variance`) put into it.  Layer l's input does not depend on layer l's
own statistics, only on those of the layers before it: its calibrated divergence shows what calibrating
layers < l did (the first BN's input is the same with and without calibration).

Estimator: per channel, a histogram over all images and spatial positions, with edges shared by the three
distributions and set by the clean activations: `--bins` equal-width bins from the clean channel's
minimum to its maximum, plus one open bin below and one above for noisy values outside that range, and
one for the values whose BN input is exactly zero (an atom: see below).  Bin
probabilities are smoothed, p = (h/n + ε) / (1 + Kε) over the K bins.  KL(clean‖noisy) = Σ p ln(p/q) and
JS = ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2 (natural log, so JS ≤ ln 2), each averaged over the layer's
channels.  `ratio` = KL uncalibrated / KL calibrated.  A plug-in histogram estimate is biased upwards
when a channel has few values per bin: a 7×7 layer gives 49 values per image and channel, and on
EfficientNet-Lite0 its two bars at 32 images are about twice those at 96.  The default, 192 images, is
chosen by the per-layer spread over image samples that the summary prints (groups of the images drawn
with replacement; docs/RESULTS.md, "Fig. 1").  Compare runs of
equal `--limit` and `--bins`.

Two places are measured per layer: its input (panels a, b), which keeps the layer's own noisy weights,
so calibration cannot bring it near the clean one; and its output, normalised with the statistics in force
((z - mean) / sqrt(var + eps), before γ and β, which are the same in every model compared; panels c, d),
where the layer's own calibrated statistics act.  The paper's Fig. 1, whose calibrated activations come
"close to the clean ones", corresponds to the outputs.  Output bins are the input bins carried through the
clean normalisation.  Many depthwise channels pile up at one point: a window of zeros into a depthwise
conv gives exactly zero, under any weight noise.  In a histogram of the normalised outputs that point mass
sits on the first bin's edge, and the smallest change of the statistics in force carried it into the open
bin below, so the KL of the channel jumped while its distribution had hardly moved
(`tools/divergence_diagnose.py` shows it per channel; docs/RESULTS.md, "Fig. 1").  The zeros are therefore
an atom of their own, in both places: the same values in every model compared, wherever the
normalisation puts them.

Temporal noise is drawn once per batch of `--batch-size` images (the paper's N_T per inference batch;
`--batch-size 1`: per image, as on the device).  Workstation only: TensorFlow is imported when it runs."""
from __future__ import annotations

import csv
import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import click
import numpy as np

from ..convert import models as zoo
from ..convert.offline_calibration import bn_layers, keras_noise_targets, set_kernels
from ..options import model_option, noise_flags, noise_options, num_threads_option, verbose_option
from ..runtime.bundle import load_bundle
from ..runtime.device_calibration import DeviceCalibration
from ..runtime.errors import BadInput
from ..runtime.noise import make_noise
from ..runtime.noisy_model import noise_targets
from ..runtime.processing import Processor, model_input, normalise
from ..stream.resolve import resolve_model
from .evaluate import datasets
from .evaluate.bootstrap import resample_weights
from .evaluate.command import EVAL_FRAME0, calibrator_flags, crops
from .evaluate.labelled import frame_of
from .scenes.photos import PHOTO_SETS

CSV_FIELDS = ("layer", "kl_uncal", "kl_cal", "js_uncal", "js_cal", "ratio",
              "kl_uncal_out", "kl_cal_out", "js_uncal_out", "js_cal_out", "ratio_out",
              "kl_uncal_spread", "kl_cal_spread", "kl_cal_out_spread", "after")  # after: the kind of layer the BN folds into


# --------------------------------------------------------------------------------- the estimator

@dataclasses.dataclass
class ChannelBins:
    """Per-channel histogram edges of one layer: `count` equal bins from `lo` to `hi` (arrays over the
    channels), plus an open bin below `lo` and one above `hi` (bin 0 and bin count + 1)."""
    lo: np.ndarray
    hi: np.ndarray
    count: int

    @property
    def width(self) -> np.ndarray:
        span = self.hi - self.lo
        return np.where(span > 0, span / self.count, 1.0)  # a constant channel: all of it in bin 1


def channel_histograms(z: np.ndarray, bins: ChannelBins, zero: np.ndarray | None = None) -> np.ndarray:
    """Counts (C, count + 3) of the values `z` (..., C) per channel (last axis) in `bins`, the last column
    the values whose BN input was exactly zero (`zero`, like `z`; default z == 0): a point mass that no
    weight noise moves (a window of zeros into a conv gives zero out), kept apart so that normalising it
    with other statistics does not carry it across a bin edge."""
    zero = (z == 0) if zero is None else zero
    z, zero = z.reshape(-1, z.shape[-1]).astype(np.float64), zero.reshape(-1, z.shape[-1])
    index = np.floor((z - bins.lo) / bins.width)
    index = np.clip(np.nan_to_num(index, nan=bins.count), 0, bins.count - 1).astype(np.int64) + 1
    index[z < bins.lo] = 0
    index[~(z <= bins.hi)] = bins.count + 1  # above the clean range, or not finite
    index[zero] = bins.count + 2
    k = bins.count + 3
    flat = index + np.arange(z.shape[1]) * k
    return np.bincount(flat.ravel(), minlength=z.shape[1] * k).reshape(z.shape[1], k)


def smoothed(counts: np.ndarray, epsilon: float) -> np.ndarray:
    """Bin probabilities per row with ε added to each and renormalised."""
    p = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    return (p + epsilon) / (1 + epsilon * counts.shape[-1])


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p‖q) per row of probabilities (0 ln 0 = 0), natural log."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(axis=-1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence per row, natural log (0 ≤ JS ≤ ln 2, symmetric)."""
    m = (p + q) / 2
    return (kl_divergence(p, m) + kl_divergence(q, m)) / 2


def divergences(clean: np.ndarray, noisy: np.ndarray, epsilon: float) -> tuple[float, float]:
    """(KL(clean‖noisy), JS) of one layer's histograms (C, K), each averaged over the channels."""
    p, q = smoothed(clean, epsilon), smoothed(noisy, epsilon)
    return float(kl_divergence(p, q).mean()), float(js_divergence(p, q).mean())


def ratio(uncalibrated: float, calibrated: float) -> float:
    return uncalibrated / calibrated if calibrated > 0 else float("nan")


# ------------------------------------------------------------------------ the BN input activations

def keras_model_of(bundle):
    """The Keras model behind `bundle`: its registered architecture (meta "model") at the bundle's input
    size, holding the bundle's own unfolded kernels, biases and BN parameters, so that an export of other
    weights is measured as it is."""
    labels = bundle.meta.get("labels") or []
    try:
        model = zoo.build(bundle.meta.get("model", ""), input_size=bundle.input_size[0],
                          num_classes=len(labels) or None)
    except KeyError as e:
        raise BadInput(bundle.path, f"{e.args[0]}: divergence needs the Keras port of the model") from None
    for rec in bundle.layers:
        try:
            model.get_layer(rec.name).set_weights([rec.kernel] + ([] if rec.bias is None else [rec.bias]))
            if rec.bn:
                model.get_layer(rec.bn).set_weights([w for w in (rec.gamma, rec.beta) if w is not None]
                                                    + [rec.mean, rec.var])
        except ValueError as e:
            raise BadInput(bundle.path, f"layer {rec.name} does not fit the {model.name} port: {e}") from None
    return model


def bn_input_probe(model, bns):
    """A Keras model with the same layers whose outputs are the inputs of `bns`, in order."""
    import keras  # lazy: TensorFlow/Keras, only when a measurement runs

    return keras.Model(model.inputs, [bn.input for bn in bns], name="bn_inputs")


def bn_statistics(bns) -> dict:
    return {bn.name: (bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in bns}


def set_bn_statistics(bns, stats: dict) -> None:
    """Put {bn: (mean, var)} into the BN layers (what `NoisyModel.set_stats` refolds on the device)."""
    for bn in bns:
        mean, var = stats[bn.name]
        bn.moving_mean.assign(np.asarray(mean, np.float32))
        bn.moving_variance.assign(np.asarray(var, np.float32))


def activations(probe, batches, before_batch=lambda i: None, progress=lambda n: None):
    """Per batch, the list of BN input activations (numpy, one per BN); `before_batch(i)` sets the model up
    for batch i (its noisy kernels)."""
    for i, x in enumerate(batches):
        before_batch(i)
        outs = probe(x, training=False)
        yield [np.asarray(z) for z in (outs if isinstance(outs, (list, tuple)) else [outs])]
        progress(len(x))


def clean_bins(layer_batches, count: int) -> list[ChannelBins]:
    """Per layer, `count` bins over each channel's [min, max] of the activations `layer_batches` yields."""
    lo = hi = None
    for zs in layer_batches:
        mins = [z.reshape(-1, z.shape[-1]).min(axis=0).astype(np.float64) for z in zs]
        maxs = [z.reshape(-1, z.shape[-1]).max(axis=0).astype(np.float64) for z in zs]
        lo = mins if lo is None else [np.minimum(a, b) for a, b in zip(lo, mins)]
        hi = maxs if hi is None else [np.maximum(a, b) for a, b in zip(hi, maxs)]
    return [ChannelBins(a, b, count) for a, b in zip(lo, hi)]


def normalised(z: np.ndarray, stats: tuple, eps: float) -> np.ndarray:
    """A BN's output before its scale and shift, (z - mean) / sqrt(var + eps), per channel (last axis):
    what the layer passes on; its γ and β are the same in every model compared, and KL and JS do not change
    under one invertible affine map of both distributions."""
    mean, var = (np.asarray(a, np.float64) for a in stats)
    return (z - mean) / np.sqrt(var + eps)


def output_bins(bins: list[ChannelBins], stats: list[tuple], eps: list[float]) -> list[ChannelBins]:
    """The clean input bins carried through the clean normalisation (increasing, so the same bins)."""
    return [ChannelBins(normalised(b.lo, st, e), normalised(b.hi, st, e), b.count) for b, st, e in zip(bins, stats, eps)]


def layer_histograms(layer_batches, bins: list[ChannelBins], out_bins: list[ChannelBins], out_stats: list,
                     eps: list, groups: int = 1) -> tuple[list, list]:
    """Per layer, the channel histograms of the inputs over what `layer_batches` yields and of the outputs
    normalised with `out_stats` (one (mean, var) per layer), kept per group of batches (batch i in group
    i mod `groups`): (inputs, outputs), each a list of arrays (groups, C, count + 3)."""
    inputs = outputs = None
    for i, zs in enumerate(layer_batches):
        g = i % groups
        if inputs is None:
            inputs = [np.zeros((groups, *b.lo.shape, b.count + 3), np.int64) for b in bins]
            outputs = [np.zeros_like(t) for t in inputs]
        for t, z, b in zip(inputs, zs, bins):
            t[g] += channel_histograms(z, b)
        for t, z, st, e, b in zip(outputs, zs, out_stats, eps, out_bins):
            t[g] += channel_histograms(normalised(z, st, e), b, zero=z == 0)
    return inputs, outputs


def bootstrap_spread(clean: list, noisy: list, epsilon: float, draws: int = 200, seed: int = 0) -> np.ndarray:
    """Per layer, the relative half-width of the 95 % interval of KL(clean‖noisy) over image samples: the
    groups of images (the first axis of each histogram array) drawn with replacement `draws` times, the
    same draw for the clean and the noisy histograms (they come from the same images)."""
    weights = resample_weights(clean[0].shape[0], draws, seed)
    values = np.empty((draws, len(clean)))
    for j, (c, n) in enumerate(zip(clean, noisy)):
        cw, nw = np.tensordot(weights, c, axes=1), np.tensordot(weights, n, axes=1)  # (draws, C, K)
        values[:, j] = kl_divergence(smoothed(cw, epsilon), smoothed(nw, epsilon)).mean(axis=-1)
    full = np.array([divergences(c.sum(0), n.sum(0), epsilon)[0] for c, n in zip(clean, noisy)])
    low, high = np.percentile(values, [2.5, 97.5], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (high - low) / 2 / full


# ------------------------------------------------------------------------------------- one setting

@dataclasses.dataclass
class Setting:
    """The noise, the calibrator and the estimator of one run."""
    preset: str
    eta: float
    seed: int = 0
    noise_options: dict = dataclasses.field(default_factory=dict)
    cal_options: dict = dataclasses.field(default_factory=dict)  # StreamCalibrator keywords
    bins: int = 64
    epsilon: float = 1e-6
    batch_size: int = 8
    num_threads: int | None = None

    def chip(self, targets: dict):
        return make_noise(self.preset, self.eta, self.seed, **self.noise_options).instantiate(targets)


def device_statistics(bundle, setting: Setting, cal_inputs, progress=lambda n: None) -> dict:
    """BN statistics after streaming batch-size-1 calibration on LiteRT under the setting's chip, over
    `cal_inputs` (device inputs of one image each, calibration frames 0…N-1)."""
    calibration = DeviceCalibration(bundle, setting.chip(noise_targets(bundle)), num_threads=setting.num_threads,
                                    seed=setting.seed, **setting.cal_options)
    return calibration.calibrate(cal_inputs, on_frame=lambda n: progress(1))


def keras_batches(bundle, xs: np.ndarray, batch_size: int):
    """Device inputs (uint8 pixels or normalised floats) as the Keras model takes them, in batches."""
    for i in range(0, len(xs), batch_size):
        x = xs[i:i + batch_size]
        yield normalise(x, bundle.meta["preprocess"]) if x.dtype == np.uint8 else x


def measure(bundle, model, eval_x: np.ndarray, cal_inputs, setting: Setting, progress=lambda n: None) -> list[dict]:
    """Per BN layer (graph order) {layer, kl_uncal, kl_cal, js_uncal, js_cal, ratio} of its inputs and the
    same keys with "_out" of its outputs (normalised with the statistics in force) on the evaluation inputs
    `eval_x` (device inputs, N×H×W×3), calibrating on `cal_inputs`; `model` (the Keras model of `bundle`) is
    left as it came."""
    bns = bn_layers(model)
    probe = bn_input_probe(model, bns)
    source_kernels = {name: k for name, (_, k) in keras_noise_targets(model).items()}
    source_stats = bn_statistics(bns)
    chip = setting.chip(keras_noise_targets(model))

    def passes(noisy: bool):
        batches = keras_batches(bundle, eval_x, setting.batch_size)
        noise = (lambda i: set_kernels(model, chip.perturb(EVAL_FRAME0 + i))) if noisy else (lambda i: None)
        return activations(probe, batches, noise, progress)

    bins = clean_bins(passes(False), setting.bins)
    eps = [float(bn.epsilon) for bn in bns]
    source = [source_stats[bn.name] for bn in bns]
    out_bins = output_bins(bins, source, eps)
    groups = image_groups(len(eval_x), setting.batch_size)
    clean = layer_histograms(passes(False), bins, out_bins, source, eps, groups)
    try:
        uncalibrated = layer_histograms(passes(True), bins, out_bins, source, eps, groups)
        calibrated_stats = device_statistics(bundle, setting, cal_inputs, progress)
        set_bn_statistics(bns, calibrated_stats)
        calibrated = layer_histograms(passes(True), bins, out_bins, [calibrated_stats[bn.name] for bn in bns], eps,
                                      groups)
    finally:
        set_kernels(model, source_kernels)
        set_bn_statistics(bns, source_stats)
    after = {rec.bn: rec.kind for rec in bundle.layers if rec.bn}
    rows = [{**layer_row(bn.name, [h[0][i].sum(0) for h in (clean, uncalibrated, calibrated)],
                         [h[1][i].sum(0) for h in (clean, uncalibrated, calibrated)], setting.epsilon),
             "after": after.get(bn.name, "")} for i, bn in enumerate(bns)]
    if groups > 1:
        spreads = {"kl_uncal_spread": bootstrap_spread(clean[0], uncalibrated[0], setting.epsilon),
                   "kl_cal_spread": bootstrap_spread(clean[0], calibrated[0], setting.epsilon),
                   "kl_cal_out_spread": bootstrap_spread(clean[1], calibrated[1], setting.epsilon)}
        for i, row in enumerate(rows):
            row.update({k: float(v[i]) for k, v in spreads.items()})
    return rows


def image_groups(images: int, batch_size: int, most: int = 8) -> int:
    """How many equal groups of batches the evaluation images fall into for the spread (at most `most`)."""
    batches = -(-images // batch_size)
    return max(d for d in range(1, most + 1) if batches % d == 0)


def layer_row(name: str, inputs: list, outputs: list, epsilon: float) -> dict:
    """One layer's row from its (clean, uncalibrated, calibrated) histograms of inputs and of outputs."""
    row = {"layer": name}
    for suffix, (c, u, k) in (("", inputs), ("_out", outputs)):
        (kl_u, js_u), (kl_c, js_c) = divergences(c, u, epsilon), divergences(c, k, epsilon)
        row.update({f"kl_uncal{suffix}": kl_u, f"kl_cal{suffix}": kl_c, f"js_uncal{suffix}": js_u,
                    f"js_cal{suffix}": js_c, f"ratio{suffix}": ratio(kl_u, kl_c)})
    return row


# ---------------------------------------------------------------------------------------- the images

def folder_inputs(bundle, files) -> np.ndarray:
    """The device inputs of image files (the stream's preprocessing), stacked N×H×W×3."""
    processor = Processor(bundle)
    return np.concatenate([processor.preprocess(frame_of(f))[0] for f in files])


def choose_inputs(bundle, data, calib_dir, limit: int, cal_frames: int, photo_set: str):
    """(evaluation inputs N×H×W×3, calibration inputs cal_frames×1×H×W×3 or a generator of them, what the
    report calls each): image folders when given, else seeded random crops of the bundled photos (other
    crops for calibration, as `edge-cbn evaluate` takes them)."""
    photo_cal, photo_eval = (None, None)
    if not (data and calib_dir):
        cal_rgb, eval_rgb = crops(bundle, "crops", cal_frames, limit, photos=photo_set)
        photo_cal, photo_eval = model_input(cal_rgb, bundle)[:, None], model_input(eval_rgb, bundle)
    eval_files = datasets.subset(datasets.calibration_images(calib_dir=data), limit) if data else None
    if calib_dir:
        cal_files = datasets.calibration_images(calib_dir=calib_dir)
        if eval_files:
            datasets.check_disjoint(cal_files, datasets.Dataset(
                "images", str(data), [datasets.Sample(f, None) for f in eval_files]))
        cal = (folder_inputs(bundle, [f]) for f in datasets.calibration_frames(cal_files, cal_frames))
    else:
        cal = photo_cal
    photos = f"random crops of the sample photos (--photos {photo_set})"
    return (folder_inputs(bundle, eval_files) if data else photo_eval, cal, str(data) if data else photos,
            str(calib_dir) if calib_dir else f"other {photos}")


# --------------------------------------------------------------------------------------- the report

def write_csv(rows: list[dict], path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in CSV_FIELDS} for r in rows)  # no spread from one group of images
    return Path(path)


def plot(rows: list[dict], title: str, path) -> Path | None:
    """The paper's Fig. 1: KL and JS per BN layer of its inputs (a, b) and of its outputs (c, d: what the
    paper's figure shows), uncalibrated (green) and calibrated (blue) bars, their ratio (red line, right
    axis); None (and one warning) without matplotlib."""
    try:
        # lazy: matplotlib is optional (the [eval] extra), only for the PNG
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: after the backend is chosen
    except ImportError:
        click.echo("warning: matplotlib is not installed, no PNG (pip install 'edge-cbn[eval]')", err=True)
        return None
    x = np.arange(1, len(rows) + 1)
    from matplotlib.ticker import MaxNLocator  # lazy: matplotlib, as above

    width = max(8.0, 0.22 * len(rows) + 3)
    fig, axes = plt.subplots(4, 1, figsize=(width, 14))
    panels = (("kl", "", "(a) KL(clean‖noisy), BN inputs"), ("js", "", "(b) JS, BN inputs"),
              ("kl", "_out", "(c) KL, BN outputs (normalised)"), ("js", "_out", "(d) JS, BN outputs (normalised)"))
    for ax, (key, where, name) in zip(axes, panels):
        uncal, cal = [np.array([r[f"{key}_{s}{where}"] for r in rows]) for s in ("uncal", "cal")]
        ax.bar(x - 0.2, uncal, 0.4, color="tab:green", label="uncalibrated")
        ax.bar(x + 0.2, cal, 0.4, color="tab:blue", label="calibrated")
        ax.set(xlabel=f"BatchNorm layer ({'output' if where else 'input'})", ylabel=name, xlim=(0.3, len(rows) + 0.7))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are counted, not measured
        twin = ax.twinx()
        twin.plot(x, [ratio(u, c) for u, c in zip(uncal, cal)], color="tab:red", marker=".", label="ratio")
        twin.set_ylabel("ratio uncalibrated / calibrated", color="tab:red")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    fig.suptitle(textwrap.fill(title, int(13 * width)), fontsize=9)  # about 13 characters an inch at 9 pt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def summary(rows: list[dict]) -> dict:
    """Means over the layers, where the uncalibrated KL is largest, and in how many layers calibration
    lowers it."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in CSV_FIELDS[1:]
            if not k.startswith("ratio") and not k.endswith("_spread") and k != "after"}
    spread = {k: float(np.nanmedian([r[k] for r in rows])) for k in CSV_FIELDS if k.endswith("_spread") and k in rows[0]}
    worst = max(range(len(rows)), key=lambda i: rows[i]["kl_uncal"])
    return {"mean": mean, "median_spread": spread, "ratio_of_means": ratio(mean["kl_uncal"], mean["kl_cal"]),
            "ratio_of_means_out": ratio(mean["kl_uncal_out"], mean["kl_cal_out"]),
            "layers_lowered_out": sum(r["kl_cal_out"] < r["kl_uncal_out"] for r in rows),
            "median_ratio": float(np.nanmedian([r["ratio"] for r in rows])),
            "largest_kl_uncal": {"index": worst + 1, **rows[worst]},
            "layers_lowered": sum(r["kl_cal"] < r["kl_uncal"] for r in rows), "layers": len(rows),
            "outputs_by_kind": outputs_by_kind(rows)}


def outputs_by_kind(rows: list[dict]) -> dict:
    """Per kind of layer before the BN (conv, depthwise, ...): how many, the mean output KL uncalibrated and
    calibrated, the median per-layer ratio and in how many calibration lowers it."""
    out = {}
    for kind in dict.fromkeys(r.get("after", "") for r in rows):
        group = [r for r in rows if r.get("after", "") == kind]
        out[kind or "other"] = {"layers": len(group),
                                "kl_uncal_out": float(np.mean([r["kl_uncal_out"] for r in group])),
                                "kl_cal_out": float(np.mean([r["kl_cal_out"] for r in group])),
                                "median_ratio_out": float(np.nanmedian([r["ratio_out"] for r in group])),
                                "lowered_out": sum(r["kl_cal_out"] < r["kl_uncal_out"] for r in group)}
    return out


def summary_text(title: str, s: dict) -> str:
    m, w = s["mean"], s["largest_kl_uncal"]
    return (f"{title}\n"
            f"KL(clean‖noisy), mean over {s['layers']} BN inputs: {m['kl_uncal']:.4g} uncalibrated -> "
            f"{m['kl_cal']:.4g} calibrated ({s['ratio_of_means']:.3g}x; median per-layer ratio "
            f"{s['median_ratio']:.3g}x); lower in {s['layers_lowered']} of {s['layers']} layers\n"
            f"JS, mean: {m['js_uncal']:.4g} -> {m['js_cal']:.4g}\n"
            f"BN outputs (normalised, the paper's Fig. 1): KL {m['kl_uncal_out']:.4g} -> {m['kl_cal_out']:.4g} "
            f"({s['ratio_of_means_out']:.3g}x), lower in {s['layers_lowered_out']} of {s['layers']} layers; "
            f"JS {m['js_uncal_out']:.4g} -> {m['js_cal_out']:.4g}\n"
            + "".join(f"  after a {kind} layer ({k['layers']}): {k['kl_uncal_out']:.3g} -> {k['kl_cal_out']:.3g}, "
                      f"median per-layer ratio {k['median_ratio_out']:.3g}x, lower in {k['lowered_out']}\n"
                      for kind, k in s["outputs_by_kind"].items() if len(s["outputs_by_kind"]) > 1)
            + f"largest uncalibrated KL: layer {w['index']} {w['layer']}, {w['kl_uncal']:.4g} -> {w['kl_cal']:.4g}"
            + spread_text(s["median_spread"]))


def spread_text(spread: dict) -> str:
    """The per-layer spread over image samples, as the summary's last line ("" without one)."""
    if not spread:
        return ""
    return ("\nspread over image samples (groups of images drawn with replacement, 200 draws): median per-layer "
            f"95 % half-width of KL, relative: inputs uncalibrated ±{100 * spread['kl_uncal_spread']:.0f} %, "
            f"calibrated ±{100 * spread['kl_cal_spread']:.0f} %; outputs calibrated "
            f"±{100 * spread['kl_cal_out_spread']:.0f} %")


def finite(value):
    """JSON has no NaN: None in its place."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not np.isfinite(value) else value


# ------------------------------------------------------------------------------------------ the CLI

@click.command("divergence", short_help="Per-BN-layer KL/JS of noisy vs clean activations, calibrated or not (Fig. 1).")
@model_option()
@noise_flags(default="relative")
@click.option("--data", type=click.Path(exists=True, file_okay=False),
              help="Folder of evaluation images (recursive) [default: random crops of the bundled sample photos].")
@click.option("--limit", type=click.IntRange(1), default=192, show_default=True,
              help="Evaluation images: crops of the photos, or a seeded random subset of --data (few images bias "
                   "the histogram estimate of small feature maps upwards; the summary prints the per-layer spread "
                   "over image samples, docs/RESULTS.md 'Fig. 1').")
@click.option("--photos", "photo_set", type=click.Choice(PHOTO_SETS), default="all", show_default=True,
              help="The sample photo set, when --data or --calib-dir is not given.")
@click.option("--calib-dir", type=click.Path(exists=True, file_okay=False),
              help="Calibration images (recursive), never evaluation images [default: other random crops of "
                   "the sample photos].")
@click.option("--cal-frames", type=click.IntRange(1), default=192, show_default=True,
              help="Streaming calibration frames (calibration images shuffled, cycled if fewer).")
@calibrator_flags()
@click.option("--bins", type=click.IntRange(2), default=64, show_default=True,
              help="Equal-width histogram bins per channel over the clean activations' [min, max] (plus one open "
                   "bin on each side).")
@click.option("--epsilon", type=click.FloatRange(0, min_open=True), default=1e-6, show_default=True,
              help="Smoothing added to every bin probability before renormalising.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Keras batch; temporal noise is drawn once per batch (1: per image, as on the device).")
@click.option("--out", "out_dir", default="edge-cbn-divergence", show_default=True,
              help="Folder for the CSV and the PNG.")
@num_threads_option()
@verbose_option()
def main(model, noise, eta, seed, noise_option, data, limit, photo_set, calib_dir, cal_frames, mode, window,
         refold_every, stages, shrink, power, bins, epsilon, batch_size, out_dir, num_threads):
    """The paper's Fig. 1: per BatchNorm layer, the KL and JS divergence between the clean and the noisy
    distributions of the layer's input and of its output (normalised with the statistics in force: what
    the paper's figure shows), uncalibrated and after streaming batch-size-1 calibration on LiteRT (on
    separate calibration images), on a folder of images or crops of the sample photos, with each layer's
    spread over image samples (groups of the evaluation images drawn with replacement).

    Estimator: per channel, a histogram over all images and positions with edges from the clean
    activations (--bins equal bins over the clean [min, max] plus an open bin each side), bin probabilities
    smoothed with --epsilon; KL(clean‖noisy) and JS (natural log, JS ≤ ln 2) averaged over the channels;
    ratio = KL uncalibrated / KL calibrated; compare runs of equal --limit and --bins.  Activations come
    from the Keras port with the bundle's tensors, the chip's noisy kernels and, calibrated, the calibrated
    statistics; a layer's input depends on the statistics of the layers before it only, so its calibrated
    divergence shows what calibrating those did (the first BN's input is the same either way).  Writes a
    CSV and a PNG (bars and ratio line, matplotlib) to --out, prints a summary and ends with one JSON line.
    Needs TensorFlow."""
    bundle = load_bundle(resolve_model(model, echo=lambda *a, **k: click.echo(*a, err=True)))
    setting = Setting(noise, eta, seed, noise_options(noise, noise_option),
                      dict(mode=mode, window=window, refold_every=refold_every, stages=stages, shrink=shrink,
                           power=power), bins, epsilon, batch_size, num_threads)
    eval_x, cal_inputs, eval_name, cal_name = choose_inputs(bundle, data, calib_dir, limit, cal_frames, photo_set)
    keras_model = keras_model_of(bundle)
    with click.progressbar(length=4 * len(eval_x) + cal_frames, label="clean, noisy, calibrating, calibrated",
                           file=sys.stderr) as bar:
        rows = measure(bundle, keras_model, eval_x, cal_inputs, setting, bar.update)
    name = bundle.meta.get("model") or Path(bundle.path).stem
    noise_text = " ".join([noise, f"η0 = {eta:g}", *noise_option])
    title = (f"{name}, noise {noise_text} (chip {seed}): BN input and output divergence on "
             f"{len(eval_x)} images ({eval_name}); calibration: {cal_frames} frames, batch 1, LiteRT ({cal_name})")
    files = write_outputs(rows, title, Path(out_dir) / f"divergence-{name}-{noise}-{eta:g}-seed{seed}")
    stats = summary(rows)
    click.echo(summary_text(title, stats))
    click.echo(json.dumps(finite({
        "divergence": name, "noise": noise, "eta": eta, "seed": seed, "noise_options": list(noise_option),
        "images": len(eval_x), "data": eval_name, "calibration": cal_name, "cal_frames": cal_frames,
        **setting.cal_options, "bins": bins, "epsilon": epsilon, "batch_size": batch_size, **stats,
        "files": files, "rows": rows})))


def write_outputs(rows: list[dict], title: str, stem: Path) -> dict:
    """`stem`.csv and `stem`.png (when matplotlib is there); {kind: path}."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = {"csv": str(write_csv(rows, f"{stem}.csv"))}
    png = plot(rows, title, f"{stem}.png")
    if png is not None:
        files["png"] = str(png)
    return files
