"""`edge-cbn bench sweep`: one labelled sweep (`edge-cbn evaluate classification` on a synthetic ImageNet-style
folder) run side by side with 1 and 2 local worker processes and on a two-node local Ray cluster (one CPU a
node), each configuration a fresh `edge-cbn` process with a fresh cache, LiteRT at one thread a worker;
the speedups, the per-image costs the workers measured, and from per-image costs of the paper's models the
projected CPU-hours and wall time of the paper's Table 1 and Table 2 sweeps."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...cluster.local_ray import LocalRayCluster
from ..evaluate.datasets import imagenet_wnids
from . import sweep_projection
from .calibrate import write_images

TABLES = {  # the paper's sweeps: images, noise levels, methods (original, offline, stream-calibrated)
    "table1": {"task": "classification", "images": 50000, "etas": 6, "methods": 3,
               "models": ["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2"]},
    "table2": {"task": "detection", "images": 5000, "etas": 3, "methods": 3, "models": ["yolov3"]},
}
OFFLINE_BATCH = {"classification": 32, "detection": 8}  # the timing batch (per-image cost is flat above ~32)


def synthetic_imagenet(root: Path, images: int, calibration: int, classes: int = 10, side: int = 400) -> tuple:
    """(val folder, calibration folder): JPEG crops of the bundled photos, `images` of them spread over the
    first `classes` ImageNet wnids (so `evaluate classification` reads them as it reads ImageNet's val)."""
    wnids = imagenet_wnids()[:classes]
    for k, wnid in enumerate(wnids):
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        write_images(root / "val" / wnid, images // classes + (k < images % classes), side, seed=k)
    (root / "cal").mkdir(parents=True, exist_ok=True)
    write_images(root / "cal", calibration, side, seed=1000)
    return root / "val", root / "cal"


def run_sweep(args: list[str], out: Path) -> dict:
    """One `edge-cbn evaluate classification` in a fresh process: its wall seconds, the CPU seconds of it
    and its local workers (Ray's workers are not its children: not counted) and its final JSON line."""
    cmd = [sys.executable, "-m", "edge_cbn.cli", "evaluate", "classification", *args, "--out", str(out)]
    cpu0, t = children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t, children_cpu_s() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return {"wall_s": round(seconds, 2), "cpu_s": round(cpu, 2),
            "result": json.loads(proc.stdout.strip().splitlines()[-1])}


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def per_image_costs(result: dict) -> dict:
    """Worker seconds per evaluation image and per streaming calibration frame, from the records' seconds
    (each record: the seconds its units took in the workers)."""
    recs = result["records"]
    images, frames = result["images"], result["cal_frames"]
    original = [r["seconds"] for r in recs if r["method"] == "original"]
    calibrated = [r["seconds"] for r in recs if r["method"] == "calibrated"]
    eval_s = sum(original) / (len(original) * images)
    cal_s = max(0.0, sum(calibrated) / len(calibrated) - eval_s * images) / frames  # records are to 10 ms
    return {"eval_s_per_image": round(eval_s, 5), "calibration_s_per_frame": round(cal_s, 5)}


def measure_speedups(model: str, val: Path, cal: Path, work: Path, *, seeds: str, noise: str, cal_frames: int,
                     shard_size: int, rounds: int, ray_address: str | None, echo) -> dict:
    """The same sweep with 1 and 2 local workers and on the Ray cluster at `ray_address` (a local two-node
    one when None), in `rounds` rounds of alternating order (1, 2, Ray, then Ray, 2, 1, …) so that a change
    of the shared machine's load falls on every configuration; {configuration: [runs]}."""
    if ray_address is None:
        with LocalRayCluster(nodes=2, cpus_per_node=1) as address:
            return measure_speedups(model, val, cal, work, seeds=seeds, noise=noise, cal_frames=cal_frames,
                                    shard_size=shard_size, rounds=rounds, ray_address=address, echo=echo)
    common = ["--model", model, "--data", str(val), "--calib-dir", str(cal), "--noise", noise, "--seeds", seeds,
              "--cal-frames", str(cal_frames), "--num-threads", "1", "--shard-size", str(shard_size)]
    configurations = [("workers_1", ["--workers", "1"]), ("workers_2", ["--workers", "2"]),
                      ("ray", ["--ray", ray_address])]
    runs = {name: [] for name, _ in configurations}
    for r in range(rounds):
        for name, extra in configurations if r % 2 == 0 else reversed(configurations):
            runs[name].append(run_sweep(common + extra, work / f"{name}-{r}"))
            echo(f"round {r + 1}, {name}: {runs[name][-1]['wall_s']} s")
    return runs


def same_metrics(runs: dict) -> bool:
    """Every run of every configuration gave the same records' metrics."""
    metrics = [[r["metrics"] for r in run["result"]["records"]] for name in runs for run in runs[name]]
    return all(m == metrics[0] for m in metrics)


def run_bench(model: str, *, images: int, seeds: str, noise: str, cal_frames: int, shard_size: int, rounds: int,
              ray_address: str | None, project: list[str], echo) -> dict:
    """Every figure of `edge-cbn bench sweep` (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="edge-cbn-bench-sweep-") as tmp:
        work = Path(tmp)
        val, cal = synthetic_imagenet(work / "data", images, max(cal_frames, 16))
        echo(f"sweep: {model}, {images} images, noise {noise}, seeds {seeds}, {cal_frames} calibration frames")
        runs = measure_speedups(model, val, cal, work, seeds=seeds, noise=noise, cal_frames=cal_frames,
                                shard_size=shard_size, rounds=rounds, ray_address=ray_address, echo=echo)
        wall = {name: min(run["wall_s"] for run in done) for name, done in runs.items()}  # the least disturbed
        sweep = {name: min(run["result"]["sweep_s"] for run in done) for name, done in runs.items()}
        fastest_1 = min(runs["workers_1"], key=lambda run: run["wall_s"])
        figures = {"bench": "sweep", "model": model, "images": images, "seeds": seeds, "noise": noise,
                   "cal_frames": cal_frames, "shard_size": shard_size, "cpus": os.cpu_count(), "rounds": rounds,
                   "wall_s": wall,
                   "wall_s_rounds": {name: [run["wall_s"] for run in done] for name, done in runs.items()},
                   "cpu_s_rounds": {name: [run["cpu_s"] for run in done] for name, done in runs.items()
                                    if name != "ray"},
                   "sweep_s": sweep,
                   "sweep_s_rounds": {name: [run["result"]["sweep_s"] for run in done] for name, done in runs.items()},
                   "speedup_2_workers": round(wall["workers_1"] / wall["workers_2"], 3),
                   "ray_vs_2_workers": round(wall["ray"] / wall["workers_2"], 3),
                   "sweep_speedup_2_workers": round(sweep["workers_1"] / sweep["workers_2"], 3),
                   "sweep_ray_vs_2_workers": round(sweep["ray"] / sweep["workers_2"], 3),
                   "same_metrics": same_metrics(runs),
                   "costs": {model: per_image_costs(fastest_1["result"])}, "load_average": os.getloadavg()[0]}
        models = sorted({m for t in project for m in TABLES[t]["models"]})
        if models:
            sweep_projection.one_tensorflow_thread()
            files = sorted(str(p) for p in val.rglob("*.jpg"))
            for name in models:
                echo(f"per-image costs of {name} ...")
                figures["costs"][name] = sweep_projection.model_costs(name, work, files[:8], files[8:24])
        figures["projection"] = {t: sweep_projection.project(TABLES[t], figures["costs"]) for t in project}
        figures["parallel_efficiency"] = round(figures["speedup_2_workers"] / 2, 3)
    return figures


def print_summary(figures: dict, echo) -> None:
    """The table: per configuration the best process wall time and sweep time (from the process's start to
    its exit, and the sweep alone, without start-up, connecting to Ray and the report), and the goals."""
    echo(f"{'configuration':<24} {'process s':>9} {'sweep s':>8}  rounds (process s / sweep s)")
    for name, title in (("workers_1", "1 local worker"), ("workers_2", "2 local workers"),
                        ("ray", "Ray, 2 nodes x 1 CPU")):
        echo(f"{title:<24} {figures['wall_s'][name]:>9.2f} {figures['sweep_s'][name]:>8.2f}  "
             f"{figures['wall_s_rounds'][name]} / {figures['sweep_s_rounds'][name]}")
    echo(f"speedup 1 -> 2 workers: {figures['speedup_2_workers']:.2f}x process, "
         f"{figures['sweep_speedup_2_workers']:.2f}x sweep (goal >= 1.7); "
         f"Ray / 2 workers: {figures['ray_vs_2_workers']:.2f} process, "
         f"{figures['sweep_ray_vs_2_workers']:.2f} sweep (goal <= 1.15); same metrics: {figures['same_metrics']}")
    for table, p in figures["projection"].items():
        echo(f"{table}: {p['cpu_hours']} CPU-hours; wall hours on nodes x CPUs: {p['wall_hours_on_nodes_x_cpus']}")
