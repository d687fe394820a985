"""LiteRT interpreters on the device: create one from model bytes, run it on an input.

Interpreter backends, first available wins: `ai_edge_litert` (x86_64/aarch64 wheels), `tflite_runtime`
(armv7l), and as a last resort `tensorflow.lite` — only if TensorFlow is already imported or installed
(never on a device install; it costs seconds of import time and hundreds of MB).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import numpy as np

from .errors import MissingDependency
from .native_log import silenced

_INTERPRETER_CLS = None
_FIRST_INTERPRETER = True


def interpreter_class():
    global _INTERPRETER_CLS
    if _INTERPRETER_CLS is None:
        try:
            from ai_edge_litert.interpreter import Interpreter  # lazy: LiteRT, only once a model is run
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter  # lazy: LiteRT's armv7l build, as above
            except ImportError:
                if "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None:
                    raise MissingDependency("a TFLite interpreter", "pip install ai-edge-litert "
                                            "(x86_64/aarch64) or tflite-runtime (armv7l)") from None
                import tensorflow as tf  # lazy: TensorFlow, the last resort (never on a device install)
                Interpreter = tf.lite.Interpreter
        _INTERPRETER_CLS = Interpreter
    return _INTERPRETER_CLS


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: `taskset`, a container's cpuset): the default
    number of LiteRT threads."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_interpreter(model_content: bytes | None = None, model_path=None, num_threads: int | None = None):
    """A LiteRT interpreter with tensors allocated.  `model_content` must not be mutated afterwards
    (the interpreter may read weights straight from it)."""
    if (model_content is None) == (model_path is None):
        raise ValueError("pass exactly one of model_content and model_path")
    global _FIRST_INTERPRETER
    with silenced() if _FIRST_INTERPRETER else contextlib.nullcontext():  # XNNPACK says hello once
        it = interpreter_class()(model_content=model_content, model_path=None if model_path is None else
                                 str(model_path), num_threads=num_threads)
        it.allocate_tensors()
    _FIRST_INTERPRETER = False
    return it


def io_indices(interpreter) -> tuple[int, list[int]]:
    """(input tensor index, output tensor indices) of an allocated interpreter."""
    return (interpreter.get_input_details()[0]["index"], [d["index"] for d in interpreter.get_output_details()])


def run_interpreter(interpreter, inp: int, outs: list[int], x: np.ndarray) -> list[np.ndarray]:
    """Set input `inp` to `x`, invoke, and return the tensors `outs` (copies)."""
    interpreter.set_tensor(inp, np.ascontiguousarray(x))
    interpreter.invoke()
    return [interpreter.get_tensor(i) for i in outs]
