"""What the bench modules share: timing, peak memory, the JSON line, and the models and statistics they
time.  The bench modules import it; it imports none of them."""
from __future__ import annotations

import json
import time

import click
import numpy as np

from ...convert import models as zoo
from ...convert.weights.assign import assign_state_dict, random_state_dict


def time_per_call(fn, *, warmup=2, min_calls=5, min_seconds=1.0) -> float:
    """Median seconds per call of `fn()` over at least `min_calls` calls and `min_seconds`."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: its VmHWM, which starts afresh at exec (rusage's
    maxrss of a child process carries the parent's size at the fork)."""
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    return round(int(kb) / 1024, 1)


def emit(figures: dict) -> None:
    click.echo(json.dumps(figures, sort_keys=True))


def perturbed_stats(bundle, seed: int) -> dict:
    """BN statistics near the exported ones (what a calibration step produces)."""
    rng = np.random.default_rng(seed)
    return {r.bn: (r.mean + rng.normal(0, 0.05, r.mean.shape).astype(np.float32),
                   r.var * rng.uniform(0.8, 1.25, r.var.shape).astype(np.float32))
            for r in bundle.layers if r.bn}


def invoke_fn(interpreter, x):
    """A no-argument function that runs `interpreter` on `x` once."""
    index = interpreter.get_input_details()[0]["index"]

    def invoke():
        interpreter.set_tensor(index, x)
        interpreter.invoke()

    return invoke


def random_model(name: str, input_size=None):
    """A registered Keras model with random weights (timings do not depend on the weight values)."""
    model = zoo.build(name, input_size=input_size)
    assign_state_dict(model, random_state_dict(model))
    return model
