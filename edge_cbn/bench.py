"""`edge-cbn bench …`: benchmark commands.  Each prints a table of figures measured side by side in one
run on this machine and ends with one JSON line of them; docs/BENCHMARKS.md records results."""
from __future__ import annotations

import json
import time

import click
import numpy as np


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


def emit(figures: dict) -> None:
    click.echo(json.dumps(figures, sort_keys=True))


@click.group()
def bench():
    """Benchmarks: models (Keras vs TFLite), refuse (re-fuse vs reconversion), stream (FPS)."""


@bench.command("models")
@click.option("--models", "names", default="", help="Comma-separated model names (default: all).")
@click.option("--num-threads", type=int, default=2, show_default=True)
@click.option("--input-size", type=int, help="Override every model's input size (default: each model's own).")
def bench_models(names, num_threads, input_size):
    """Per model: Keras ms/frame, TFLite (LiteRT) ms/frame and TFLiteConverter seconds, batch size 1,
    random weights (timings do not depend on the weight values)."""
    from . import models as zoo
    from .export import convert_keras, fold_model
    from .runtime import make_interpreter
    from .weights.assign import assign_state_dict, random_state_dict

    rows = {}
    click.echo(f"{'model':<20} {'input':>5} {'keras ms':>9} {'tflite ms':>9} {'convert s':>9}")
    for name in [n for n in names.split(",") if n] or zoo.names():
        model = zoo.build(name, input_size=input_size)
        assign_state_dict(model, random_state_dict(model))
        side = model.input_shape[1]
        x = np.random.default_rng(0).normal(size=(1, side, side, 3)).astype(np.float32)
        keras_s = time_per_call(lambda: model(x, training=False))
        t = time.perf_counter()
        content = convert_keras(fold_model(model))
        convert_s = time.perf_counter() - t
        interp = make_interpreter(model_content=content, num_threads=num_threads)
        interp.allocate_tensors()
        inp = interp.get_input_details()[0]["index"]

        def invoke():
            interp.set_tensor(inp, x)
            interp.invoke()

        tflite_s = time_per_call(invoke)
        rows[name] = {"input": side, "keras_ms": round(keras_s * 1e3, 2), "tflite_ms": round(tflite_s * 1e3, 2),
                      "convert_s": round(convert_s, 2)}
        r = rows[name]
        click.echo(f"{name:<20} {side:>5} {r['keras_ms']:>9.2f} {r['tflite_ms']:>9.2f} {r['convert_s']:>9.2f}")
    emit({"bench": "models", "num_threads": num_threads, "models": rows})
