"""`edge-cbn bench refold`: refolding new BN statistics on the device against reconverting in Keras."""
from __future__ import annotations

import itertools

import numpy as np

from ...convert import models as zoo
from ...runtime.bundle import load_bundle
from ...runtime.interpreter import make_interpreter
from ...runtime.refold import Refolder
from .timing import invoke_fn, perturbed_stats, random_model, time_per_call


def refold_figures(name: str, tmp: str, num_threads: int) -> dict:
    """Refold, reconvert, interpreter build and invoke times of registered model `name` (random
    weights), exported into folder `tmp`."""
    from ...convert.export import convert_keras, export  # lazy: TensorFlow (the converter)
    from ...convert.keras_fold import fold_model  # lazy: TensorFlow (the converter)

    spec, model = zoo.get_spec(name), random_model(name)
    bundle = load_bundle(export(model, f"{tmp}/{name}.tflite", name=name, task=spec.task,
                                preprocess=spec.preprocess, labels=[], calibration=False))
    stats = [perturbed_stats(bundle, s) for s in (1, 2)]
    turn = itertools.count()
    refolder = Refolder(bundle)

    def refold():
        refolder.refold(stats[next(turn) % 2])
        return refolder.model_bytes()

    refold_s = time_per_call(refold, warmup=1, min_calls=5)
    content = refolder.model_bytes()
    build_s = time_per_call(lambda: make_interpreter(model_content=content, num_threads=num_threads),
                            warmup=1, min_calls=3)
    it = make_interpreter(model_content=content, num_threads=num_threads)
    detail = it.get_input_details()[0]
    invoke_s = time_per_call(invoke_fn(it, np.zeros(detail["shape"], detail["dtype"])))
    bns = {rec.bn: model.get_layer(rec.bn) for rec in bundle.layers if rec.bn}

    def reconvert():
        for bn, (mean, var) in stats[next(turn) % 2].items():
            bns[bn].moving_mean.assign(mean)
            bns[bn].moving_variance.assign(var)
        return convert_keras(fold_model(model))

    reconvert_s = time_per_call(reconvert, warmup=0, min_calls=2, min_seconds=0)
    return {"refold_ms": round(refold_s * 1e3, 2), "reconvert_s": round(reconvert_s, 2),
            "ratio": round(reconvert_s / refold_s, 1), "build_ms": round(build_s * 1e3, 1),
            "invoke_ms": round(invoke_s * 1e3, 2),
            "ratio_with_build": round((reconvert_s + build_s) / (refold_s + build_s), 1),
            "tflite_mb": round(len(bundle.model_bytes) / 2**20, 1)}
