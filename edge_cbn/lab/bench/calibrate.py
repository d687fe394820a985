"""`edge-cbn bench calibrate`: offline calibration (Algorithm 1) against torch's `update_bn`, on the same
images, threads and batch size, each run in a fresh process so that its peak RSS is its own.

A run reports steady-state images/s: the first batch (TensorFlow traces its graph there, torch warms its
allocator) is timed apart.  Both sides decode and resize the images with the same code
(`offline_calibration.image_batches`); edge-cbn overlaps that with the forward pass, torch's loop does
not, as a `DataLoader` without workers would not.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

from ...convert import models as zoo
from ...convert.offline_calibration import (bn_layers, calibrate_bn, calibrate_on_images, image_batches,
                                            keras_noise_targets, set_kernels)
from ...runtime.noise import make_noise
from ..scenes.photos import load_photos, random_crops
from .timing import peak_rss_mb, random_model
from .statistics import relative_difference


def write_images(folder, n: int, size: int = 256, seed: int = 0) -> list[str]:
    """`n` JPEG crops of the photos the data extra ships (the same files for every run)."""
    crops, _ = random_crops(load_photos("natural"), n, size, seed=seed)
    paths = []
    for i, rgb in enumerate(crops):
        paths.append(os.path.join(folder, f"{i:04d}.jpg"))
        cv2.imwrite(paths[-1], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return paths


class BatchTimer:
    """`tick(n)` after each batch of n images; `figures()`: the first batch's seconds (from creation) and
    the steady-state images/s of the batches after it."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock  # time.process_time: CPU seconds, what `bench sweep` projects from
        self.start, self.marks = clock(), []

    def tick(self, images: int) -> None:
        self.marks.append((self.clock(), images))

    def figures(self) -> dict:
        (t_first, n_first), (t_last, _) = self.marks[0], self.marks[-1]
        images = sum(n for _, n in self.marks[1:])
        return {"first_batch_s": round(t_first - self.start, 2), "images": n_first + images,
                "images_per_s": round(images / (t_last - t_first), 2) if images and t_last > t_first else None}


def edge_cbn_side(model_name, files, batch_size, threads, noise, eta) -> dict:
    from ...convert.tf_import import tf  # lazy: TensorFlow, only in the edge-cbn child process

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    spec, model = zoo.get_spec(model_name), random_model(model_name)
    timer = BatchTimer()
    calibrate_on_images(spec, model, files, noise=noise, eta=eta, batch_size=batch_size, progress=timer.tick)
    return timer.figures()


def float64_statistics(model, batch) -> dict:
    """Train-mode BN input statistics the slow way, the path before the in-graph reduction: every
    activation comes back and is reduced in float64 numpy.  {bn: (mean, unbiased var)}."""
    from ...convert.tf_import import keras  # lazy: TensorFlow, only in the check child process

    bns = bn_layers(model)
    probe = keras.Model(model.inputs, [bn.input for bn in bns])
    out = {}
    for bn, a in zip(bns, probe(batch, training=True)):
        a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
        out[bn.name] = (a.mean(0), a.var(0, ddof=1))
    return out


def check_side(model_name, files, batch_size, noise, eta) -> dict:
    """The fast path's statistics of the first batch against `float64_statistics`, same noise draw."""
    spec, model = zoo.get_spec(model_name), random_model(model_name)
    batch = next(image_batches(files, spec.preprocess, spec.input_size, batch_size))
    chip = make_noise(noise, eta, 0).instantiate(keras_noise_targets(model))
    fast = calibrate_bn(model, [batch], chip=chip, estimator="cumulative")
    set_kernels(model, chip.perturb(0))
    return {"max_rel_diff": float(f"{relative_difference(fast, float64_statistics(model, batch)):.3g}")}


def torch_side(model_name, files, batch_size, threads) -> dict:
    import torch  # lazy: torch, only in the torch child process (--torch-python)
    import torchvision  # lazy: likewise

    torch.set_num_threads(threads)
    model = getattr(torchvision.models, model_name)(weights=None)  # the zoo uses torchvision's names
    spec = zoo.get_spec(model_name)
    batches = (torch.from_numpy(b).permute(0, 3, 1, 2).contiguous()
               for b in image_batches(files, spec.preprocess, spec.input_size, batch_size))
    timer = BatchTimer()
    torch.optim.swa_utils.update_bn(TickingLoader(batches, timer.tick), model)
    return timer.figures()


class TickingLoader:
    """A loader for `update_bn` that reports each batch once the model has run on it."""

    def __init__(self, batches, tick):
        self.batches, self.tick = batches, tick

    def __iter__(self):
        last = None
        for batch in self.batches:
            if last is not None:
                self.tick(len(last))
            last = batch
            yield batch
        if last is not None:
            self.tick(len(last))


def child(argv) -> None:
    """One run in this process; prints its figures and peak RSS as one JSON line."""
    side, model_name, folder, batch_size, threads, noise, eta = argv
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    batch_size, threads, eta = int(batch_size), int(threads), float(eta)
    if side == "torch":
        figures = torch_side(model_name, files, batch_size, threads)
    elif side == "check":
        figures = check_side(model_name, files, batch_size, noise, eta)
    else:
        figures = edge_cbn_side(model_name, files, batch_size, threads, noise, eta)
    figures["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(figures))


def run_child(python, side, model_name, folder, batch_size, threads, noise, eta) -> dict | None:
    """A fresh process for one run; None (with the reason) when it could not run."""
    cmd = [python, "-m", "edge_cbn.lab.bench.calibrate", side, model_name, folder, str(batch_size),
           str(threads), noise, str(eta)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
               OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_calibrate(models, images, batch_size, large_batch, threads, noise, eta, torch_python, echo) -> dict:
    """Every figure of `edge-cbn bench calibrate`; `echo` reports each run as it ends."""
    result = {"bench": "calibrate", "images": images, "batch_size": batch_size, "large_batch": large_batch,
              "num_threads": threads, "noise": f"{noise} eta={eta:g}", "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        write_images(folder, images)
        for name in models:
            row = result["models"][name] = {}
            row["edge_cbn"] = run_child(sys.executable, "edge", name, folder, batch_size, threads, noise, eta)
            echo(f"{name}: edge-cbn batch {batch_size}: {row['edge_cbn']}")
            row["torch"] = run_child(torch_python, "torch", name, folder, batch_size, threads, noise, eta)
            echo(f"{name}: torch update_bn batch {batch_size}: {row['torch']}")
            if large_batch:
                row["edge_cbn_large"] = run_child(sys.executable, "edge", name, folder, large_batch, threads, noise,
                                                  eta)
                echo(f"{name}: edge-cbn batch {large_batch}: {row['edge_cbn_large']}")
            row["check"] = run_child(sys.executable, "check", name, folder, batch_size, threads, noise, eta)
            echo(f"{name}: in-graph statistics against float64 activations: {row['check']}")
            ours, theirs = (row[k] and row[k].get("images_per_s") for k in ("edge_cbn", "torch"))
            row["ratio"] = round(ours / theirs, 3) if ours and theirs else None
    return result


if __name__ == "__main__":
    child(sys.argv[1:])
