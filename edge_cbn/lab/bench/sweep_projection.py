"""Per-image costs of the paper's models on the device path in CPU seconds (process time, so that another
load on a shared machine does not count; LiteRT at one thread, TensorFlow at one thread), and what they
make of the paper's full sweeps (`sweep.TABLES`): CPU-hours, and wall time on N nodes with every CPU
busy (divide by the parallel efficiency `edge-cbn bench sweep` measures).

Costs per model, random weights (time does not depend on the values), the harness's own functions:
- evaluation: one image through `labelled.score` under a `paper` chip with the default 8 noise states
  (decode, crop, resize, the noisy invoke, top-k or YOLO decode + NMS);
- streaming calibration: one frame of `labelled.streaming_statistics` (exact per-frame noise: an
  interpreter built every frame, the calibration variant and the clean one, refolds at the default cadence);
- offline (Algorithm 1): one image of `labelled.offline_statistics` in Keras at batch 32 (8 for YOLOv3),
  steady state (the first batch, where TensorFlow traces, is left out)."""
from __future__ import annotations

import time
from pathlib import Path

from ...convert.build import build_model, export_model
from ...runtime.bundle import load_bundle
from ...runtime.processing import Processor
from ...runtime.stream_calibrator import DEFAULTS as CAL_DEFAULTS, SHRINK
from ..evaluate import datasets, labelled
from .calibrate import BatchTimer

CAL_FRAMES = 192  # the harness's --cal-frames (and --offline-frames) default
SEEDS = 3  # the harness's default chip seeds
NODES = (1, 4, 16)


class NullScorer:
    """A scorer that keeps nothing: the cost of a prediction without the metric's bookkeeping."""

    def add(self, sample, prediction) -> None:
        pass

    def result(self) -> dict:
        return {}


def model_setup(name: str, folder: Path, val: list, cal: list):
    """The harness's Setup of registered model `name`, random weights, exported; its Keras model kept for
    the offline method; one LiteRT thread."""
    spec, model = build_model(name, allow_random=True)
    bundle = load_bundle(export_model(spec, model, folder / f"{name}.tflite"))
    options = labelled.DETECTION_THRESHOLDS if spec.task == "detection" else {}
    dataset = datasets.Dataset(spec.task, "synthetic", [datasets.Sample(Path(p), 0) for p in val])
    setup = labelled.Setup(bundle, Processor(bundle, **options), dataset, NullScorer, list(cal),
                           cal_options={**{k: CAL_DEFAULTS[k] for k in labelled.CAL_OPTIONS}, "shrink": SHRINK},
                           center_crop=0.875 if spec.task == "classification" else 1.0, noise_states=8, num_threads=1,
                           keras_model=model, offline_batch=8 if spec.task == "detection" else 32)
    return setup


def one_tensorflow_thread() -> None:
    """TensorFlow at one thread, as a worker of one CPU (before it runs anything)."""
    from ...convert.tf_import import tf  # lazy: TensorFlow, only when the models are timed (--project)

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def model_costs(name: str, folder: Path, val: list, cal: list) -> dict:
    """Seconds per evaluation image, per streaming calibration frame and per offline image of `name`."""
    setup = model_setup(name, folder, val, cal)
    chip, noisy = labelled.chip_model(setup, "paper", 0.1, 0, {})
    t = time.process_time()
    labelled.score(setup, noisy.run)
    eval_s = (time.process_time() - t) / len(val)
    t = time.process_time()
    labelled.streaming_statistics(setup, chip, 0, lambda n: None)
    cal_s = (time.process_time() - t) / len(cal)
    setup.offline_calibration = list(cal) * (-(-3 * setup.offline_batch // len(cal)))  # three batches
    setup.offline_calibration = setup.offline_calibration[:3 * setup.offline_batch]
    timer = BatchTimer(clock=time.process_time)
    labelled.offline_statistics(setup, "paper", 0.1, 0, {}, "cumulative", timer.tick)
    offline = timer.figures()["images_per_s"]
    return {"task": setup.dataset.task, "eval_s_per_image": round(eval_s, 4),
            "calibration_s_per_frame": round(cal_s, 4),
            "offline_s_per_image": round(1 / offline, 4) if offline else None}


def project(table: dict, costs: dict, shard_size: int = 100) -> dict:
    """CPU-hours of a paper sweep (every model x noise level x chip seed: each method scores every image,
    plus a streaming and an offline calibration of CAL_FRAMES each), and its wall hours on N nodes of 2 and
    of 16 CPUs when every CPU is busy: the CPU-hours shared out, but never less than the longest unit (a
    calibration stream is one unit; a shard is `shard_size` images)."""
    seconds, longest = {}, 0.0
    for name in table["models"]:
        c = costs[name]
        offline = c["offline_s_per_image"] or 0
        per_chip = table["methods"] * table["images"] * c["eval_s_per_image"] + CAL_FRAMES * (
            c["calibration_s_per_frame"] + offline)
        seconds[name] = per_chip * table["etas"] * SEEDS
        longest = max(longest, CAL_FRAMES * max(c["calibration_s_per_frame"], offline),
                      shard_size * c["eval_s_per_image"])
    cpu_hours = sum(seconds.values()) / 3600
    wall = {f"{n}x{cpus}": round(max(cpu_hours / (n * cpus), longest / 3600), 2) for cpus in (2, 16) for n in NODES}
    return {"cpu_hours": round(cpu_hours, 1),
            "cpu_hours_per_model": {k: round(v / 3600, 1) for k, v in seconds.items()},
            "wall_hours_on_nodes_x_cpus": wall, "longest_unit_hours": round(longest / 3600, 3), "seeds": SEEDS,
            **{k: table[k] for k in ("images", "etas", "methods")}}
