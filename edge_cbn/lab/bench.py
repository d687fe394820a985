"""`edge-cbn bench …`: benchmark commands.  Each prints a table of figures measured side by side in one
run on this machine and ends with one JSON line of them; docs/BENCHMARKS.md records results."""
from __future__ import annotations

import dataclasses
import json
import os
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


def _perturbed_stats(bundle, seed: int) -> dict:
    """BN statistics near the exported ones (what a calibration step produces)."""
    rng = np.random.default_rng(seed)
    return {r.bn: (r.mean + rng.normal(0, 0.05, r.mean.shape).astype(np.float32),
                   r.var * rng.uniform(0.8, 1.25, r.var.shape).astype(np.float32))
            for r in bundle.layers if r.bn}


@bench.command("stream")
@click.option("--model", default=None, help="Registered name or exported .tflite (default: efficientnet_lite0).")
@click.option("--num-threads", type=int, default=os.cpu_count(), show_default=True)
@click.option("--frames", type=int, default=300, show_default=True, help="Frames per stream measurement.")
@click.option("--noise", "preset", default="relative", show_default=True, help="Noise preset of the noisy runs.")
@click.option("--eta", type=float, default=0.05, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=9, show_default=True,
              help="Alternations of the bare invoke and the clean stream; the ratio is their median.")
def bench_stream(model, num_threads, frames, preset, eta, rounds):
    """Frames per second of `edge-cbn stream` on the bundled sample clip (headless with no outputs, so no
    overlay is drawn; no agreement passes), measured in one run on one model and thread count: raw LiteRT invoke, the clean
    stream, the noisy stream (pooled and exact temporal noise), and calibrating over the warm-up; plus
    the per-frame cost of exact noise and the cost of one re-fuse."""
    from .engine import NoisyModel, noise_layers
    from .noise import make_noise
    from .runtime import Processor, make_interpreter
    from .stream import Engine, StreamLoop, StreamOptions, load_model, open_frames

    bundle, name = load_model(model, echo=lambda *a, **k: click.echo(*a, **{**k, "err": True}))
    with open_frames() as src:
        frame = src.read()
    x, _ = Processor(bundle).preprocess(frame)
    it = make_interpreter(model_content=bundle.model_bytes, num_threads=num_threads)
    inp = it.get_input_details()[0]["index"]

    def invoke():
        it.set_tensor(inp, x)
        it.invoke()

    no_xnnpack_ms = _no_xnnpack_invoke_ms(bundle.model_bytes, x, num_threads)
    base = StreamOptions(num_threads=num_threads, headless=True, quiet=True, agreement_every=0)

    def stream_fps(n_frames=None, engine=None, **changes):
        opts = dataclasses.replace(base, **changes)
        engine = engine or Engine(bundle, opts)
        opts.frames = n_frames  # None: until the calibration has converged, however many frames it takes
        with open_frames() as source:
            summary = StreamLoop(engine, source, opts, model_name=name,
                                 until=None if n_frames else (lambda: engine.converged)).run()
        return summary["fps"], summary, engine

    fig = {"bench": "stream", "model": name, "num_threads": num_threads, "frames": frames, "rounds": rounds,
           "noise": f"{preset} eta={eta:g}", "noise_pool": base.noise_pool, "no_xnnpack_invoke_ms": no_xnnpack_ms}
    stream_fps(frames // 4)  # warm caches and the video decoder: the first stream would be slower
    # The bare invoke and the clean stream alternate, `rounds` times: this shared machine's speed drifts
    # within a run, so each ratio pairs figures taken a second apart; medians are reported.
    # Both are frames / elapsed over `frames` frames: a median per call would drop the hiccups of the
    # shared machine from the invoke's figure but not from the stream's.
    def raw_fps():
        invoke()
        t = time.perf_counter()
        for _ in range(frames):
            invoke()
        return frames / (time.perf_counter() - t)

    raw, clean = [], []
    for _ in range(rounds):
        raw.append(raw_fps())
        clean.append(stream_fps(frames)[0])
    fig.update(raw_fps=round(float(np.median(raw)), 2), raw_ms=round(1e3 / float(np.median(raw)), 2),
               stream_fps=round(float(np.median(clean)), 2),
               stream_ratio=round(float(np.median(np.divide(clean, raw))), 3),
               stream_ratios=[round(float(r), 3) for r in np.divide(clean, raw)])
    noisy = dict(noise=preset, eta=eta, calibrate=False)
    fig["noisy_stream_fps"] = stream_fps(frames, **noisy)[0]
    fig["noisy_exact_stream_fps"] = stream_fps(max(10, frames // 4), **noisy, noise_pool=0)[0]
    fig["calibrating_fps"] = fig["tracking_fps"] = None
    if bundle.can_calibrate:
        calibrating = dict(noise=preset, eta=eta, calibrate=True)
        fps, summary, engine = stream_fps(None, **calibrating)
        fig.update(calibrating_fps=fps, calibrating_frames=summary["frames"], calibrating_refuses=summary["refuses"])
        # The same engine once converged: calibration 4x rarer, a re-fuse every --track-every of its frames.
        fps, summary, _ = stream_fps(2 * frames, engine, **calibrating)
        fig.update(tracking_fps=fps, tracking_refuses=summary["refuses"] - fig["calibrating_refuses"])

    chip = make_noise(preset, eta, 0).instantiate(noise_layers(bundle))
    exact = NoisyModel(bundle, chip, num_threads=num_threads, pool=0)
    frame_no = iter(range(1 << 30))
    fig["noise_ms_per_frame"] = round(time_per_call(lambda: exact.interpreter(next(frame_no))) * 1e3, 2)
    stats = [_perturbed_stats(bundle, s) for s in (1, 2)]
    for key, model_ in (("refuse_ms", NoisyModel(bundle, chip, num_threads=num_threads, pool=base.noise_pool)),
                        ("refuse_clean_ms", NoisyModel(bundle, None, num_threads=num_threads))):
        turn = iter(range(1 << 30))
        fig[key] = round(time_per_call(lambda: model_.set_stats(stats[next(turn) % 2]), warmup=1, min_calls=3)
                         * 1e3, 1)

    rows = [("raw LiteRT invoke (fps)", "raw_fps"), ("invoke without XNNPACK (ms)", "no_xnnpack_invoke_ms"),
            ("clean stream (fps)", "stream_fps"), ("clean stream / raw invoke", "stream_ratio"),
            (f"noisy stream, pool {base.noise_pool} (fps)", "noisy_stream_fps"),
            ("noisy stream, exact (fps)", "noisy_exact_stream_fps"), ("calibrating, to convergence (fps)", "calibrating_fps"),
            ("calibrating, tracking after it (fps)", "tracking_fps"),
            ("exact noise: write + build (ms/frame)", "noise_ms_per_frame"),
            (f"re-fuse, pool {base.noise_pool} (ms)", "refuse_ms"), ("re-fuse, clean (ms)", "refuse_clean_ms")]
    click.echo(f"{name}, {num_threads} threads, noise {fig['noise']}")
    for label, key in rows:
        click.echo(f"  {label:<40} {fig[key] if fig[key] is not None else '-':>10}")
    emit(fig)


def _no_xnnpack_invoke_ms(model_bytes, x, num_threads):
    """Invoke time with the builtin kernels only, which read weights in place (so a live buffer patch
    would need no rebuild); None where the interpreter has no such option."""
    from .runtime import interpreter_class

    try:
        from ai_edge_litert.interpreter import OpResolverType
    except ImportError:
        return None
    it = interpreter_class()(model_content=bytes(model_bytes), num_threads=num_threads,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    inp = it.get_input_details()[0]["index"]

    def invoke():
        it.set_tensor(inp, x)
        it.invoke()

    return round(time_per_call(invoke) * 1e3, 2)


@bench.command("refuse")
@click.option("--models", "names", default="efficientnet_lite0,resnet50", show_default=True,
              help="Comma-separated model names (random weights).")
@click.option("--num-threads", type=int, default=os.cpu_count(), show_default=True)
def bench_refuse(names, num_threads):
    """New BN statistics into a model, per model: on-device re-fuse (Refuser.refuse into the flatbuffer's
    buffers, no TensorFlow) against reconversion (statistics set in Keras, fold_model + TFLiteConverter).
    Both produce model bytes; building an interpreter from them (XNNPACK packs the weights) costs the
    same after either and is reported beside them, with one invoke for scale."""
    import tempfile

    from . import models as zoo
    from .bundle import load_bundle
    from .export import convert_keras, export, fold_model
    from .refuse import Refuser
    from .runtime import make_interpreter
    from .weights.assign import assign_state_dict, random_state_dict

    rows = {}
    click.echo(f"{'model':<20} {'refuse ms':>10} {'reconvert s':>12} {'ratio':>8} {'build ms':>9} {'invoke ms':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in names.split(",") if n]:
            spec = zoo.get_spec(name)
            model = zoo.build(name)
            assign_state_dict(model, random_state_dict(model))
            path = export(model, f"{tmp}/{name}.tflite", name=name, task=spec.task, preprocess=spec.preprocess,
                          labels=[], calibration=False)
            bundle = load_bundle(path)
            stats = [_perturbed_stats(bundle, s) for s in (1, 2)]
            refuser = Refuser(bundle)
            turn = iter(range(1 << 30))

            def refuse():
                refuser.refuse(stats[next(turn) % 2])
                return refuser.model_bytes()

            refuse_s = time_per_call(refuse, warmup=1, min_calls=5)
            content = refuser.model_bytes()
            build_s = time_per_call(lambda: make_interpreter(model_content=content, num_threads=num_threads),
                                    warmup=1, min_calls=3)
            it = make_interpreter(model_content=content, num_threads=num_threads)
            detail = it.get_input_details()[0]
            x = np.zeros(detail["shape"], detail["dtype"])

            def invoke():
                it.set_tensor(detail["index"], x)
                it.invoke()

            invoke_s = time_per_call(invoke)
            bns = {rec.bn: model.get_layer(rec.bn) for rec in bundle.layers if rec.bn}

            def reconvert():
                for bn, (mean, var) in stats[next(turn) % 2].items():
                    layer = bns[bn]
                    layer.moving_mean.assign(mean)
                    layer.moving_variance.assign(var)
                return convert_keras(fold_model(model))

            reconvert_s = time_per_call(reconvert, warmup=0, min_calls=2, min_seconds=0)
            rows[name] = {"refuse_ms": round(refuse_s * 1e3, 2), "reconvert_s": round(reconvert_s, 2),
                          "ratio": round(reconvert_s / refuse_s, 1), "build_ms": round(build_s * 1e3, 1),
                          "invoke_ms": round(invoke_s * 1e3, 2),
                          "ratio_with_build": round((reconvert_s + build_s) / (refuse_s + build_s), 1),
                          "tflite_mb": round(len(bundle.model_bytes) / 2**20, 1)}
            r = rows[name]
            click.echo(f"{name:<20} {r['refuse_ms']:>10.2f} {r['reconvert_s']:>12.2f} {r['ratio']:>7.1f}x "
                       f"{r['build_ms']:>9.1f} {r['invoke_ms']:>10.2f}")
    emit({"bench": "refuse", "num_threads": num_threads, "models": rows})
