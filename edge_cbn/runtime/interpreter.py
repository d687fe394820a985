"""LiteRT interpreters on the device: create one from model bytes, run it on an input.

Interpreter backends, first available wins: `ai_edge_litert` (x86_64/aarch64 wheels), `tflite_runtime`
(armv7l), and as a last resort `tensorflow.lite` — only if TensorFlow is already imported or installed
(never on a device install; it costs seconds of import time and hundreds of MB).

Delegates (`open_delegate`): serving may run on a LiteRT delegate library (the Edge TPU, the GPU, any
external delegate) instead of XNNPACK, LiteRT's built-in CPU delegate.  A delegate is loaded once and
the one object is handed to every interpreter built on it (LiteRT supports sharing one delegate among
interpreters and keeps it alive as long as any of them).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import os
import platform
import sys

import numpy as np

from .errors import BadInput, MissingDependency
from .native_log import silenced

CPU_DELEGATE = "xnnpack"  # built into LiteRT and applied by default: no library to load
# --delegate NAME -> the delegate library of each platform (platform.system(); others: Linux's name).
DELEGATE_LIBRARIES = {
    "edgetpu": {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"},
    "gpu": {"Linux": "libtensorflowlite_gpu_delegate.so", "Darwin": "libtensorflowlite_gpu_delegate.dylib",
            "Windows": "tensorflowlite_gpu_delegate.dll"},
}
AUTO_ORDER = ("edgetpu", "gpu")  # what --delegate auto tries, in turn, before falling back to the CPU
DELEGATE_NAMES = (CPU_DELEGATE, *DELEGATE_LIBRARIES, "auto")
# The external-delegate interface (LiteRT's external_delegate_interface.h) that load_delegate calls.
_PLUGIN_SYMBOLS = ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")

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


@dataclasses.dataclass(frozen=True)
class Delegate:
    """Where interpreters built with it run (`open_delegate`).

    Attributes:
        name: "xnnpack" (LiteRT's CPU default), or the delegate library loaded, as given or resolved.
        loaded: the LiteRT delegate object, shared by every interpreter built with it; None for xnnpack.
        notice: with --delegate auto, one line naming what could not load (None otherwise).
    """
    name: str = CPU_DELEGATE
    loaded: object = None
    notice: str | None = None


def delegate_library(spec: str, system: str | None = None) -> str | None:
    """The library that `--delegate spec` loads.

    Args:
        spec: "xnnpack", "gpu", "edgetpu", or a delegate library (a path, or a name the loader searches).
        system: the platform, as `platform.system()` names it (None: this one).

    Returns:
        None for xnnpack (built in), the platform's library name for gpu and edgetpu, else `spec` itself.

    Raises:
        ValueError: "auto", which names no one library (`open_delegate` tries several).
    """
    if spec == "auto":
        raise ValueError("--delegate auto names no one library: open_delegate tries them in turn")
    if spec == CPU_DELEGATE:
        return None
    if spec in DELEGATE_LIBRARIES:
        names = DELEGATE_LIBRARIES[spec]
        return names.get(system or platform.system(), names["Linux"])
    return spec


def open_delegate(spec: str = CPU_DELEGATE, options: dict | None = None, *,
                  model_content: bytes | None = None) -> Delegate:
    """Load the delegate `spec` names, once (loading is expensive; the object is shared by every interpreter
    built with it).  With `model_content` it must also take that model (one interpreter is built on it).

    Args:
        spec: "xnnpack", "gpu", "edgetpu", a delegate library's path, or "auto": edgetpu, then gpu, and
            xnnpack when neither loads (the `notice` names what could not).
        options: the delegate's options {key: value} (LiteRT's `load_delegate` options); ignored by xnnpack.
        model_content: a model the delegate must be able to run; None: loading is enough.

    Returns:
        The `Delegate`.

    Raises:
        BadInput: the library cannot be loaded, is no LiteRT delegate, does not create its delegate or
            cannot run `model_content` (never with "auto", which falls back to xnnpack).
        MissingDependency: no TFLite interpreter is installed.
    """
    if spec == "auto":
        failed = []
        for name in AUTO_ORDER:
            try:
                return open_delegate(name, options, model_content=model_content)
            except BadInput as e:
                failed.append(f"{name} ({e})")
        return Delegate(notice=f"--delegate auto: {' and '.join(failed)} could not load; serving on {CPU_DELEGATE}")
    library = delegate_library(spec)
    if library is None:
        return Delegate()
    delegate = Delegate(library, _load_delegate(library, options))
    if model_content is not None:
        make_interpreter(model_content=model_content, num_threads=1, delegate=delegate)
    return delegate


def _load_delegate(library: str, options: dict | None):
    """LiteRT's `load_delegate`, once ctypes has seen that `library` loads and has the plugin's entry points:
    LiteRT's own attempt at a library that does not would leave a half-built object behind, whose
    finaliser prints a traceback."""
    try:
        lib = ctypes.CDLL(library)
    except OSError as e:
        raise BadInput(library, f"cannot be loaded: {_reason(e, library)}") from None
    missing = [symbol for symbol in _PLUGIN_SYMBOLS if not hasattr(lib, symbol)]
    if missing:
        raise BadInput(library, f"is no LiteRT delegate library (it has no {missing[0]})")
    load = sys.modules[interpreter_class().__module__].load_delegate  # the interpreter backend's own
    try:
        return load(library, options or None)
    except (ValueError, RuntimeError) as e:
        raise BadInput(library, f"did not create its delegate: {_reason(e, library)}") from None


def _reason(e: Exception, library: str) -> str:
    """The informative line of a loader's or LiteRT's message (without the library's name it repeats)."""
    lines = [line.strip() for line in str(e).splitlines()
             if line.strip() and not line.startswith("Failed to load delegate from")]
    reason = lines[-1] if lines else ""
    if reason.startswith(f"{library}: "):
        reason = reason[len(library) + 2:]
    return reason or f"{type(e).__name__}, no message"


def make_interpreter(model_content: bytes | None = None, model_path=None, num_threads: int | None = None,
                     delegate: Delegate | None = None):
    """A LiteRT interpreter with tensors allocated.  `model_content` must not be mutated afterwards
    (the interpreter may read weights straight from it).

    Args:
        model_content: the model's flatbuffer bytes (or `model_path`, not both).
        model_path: the `.tflite` file.
        num_threads: LiteRT's CPU threads (None: LiteRT's default).
        delegate: where it runs (`open_delegate`); None: XNNPACK, LiteRT's CPU default.

    Returns:
        The allocated interpreter.

    Raises:
        ValueError: both or neither of `model_content` and `model_path`; a model LiteRT cannot load.
        BadInput: the delegate cannot run the model.
        MissingDependency: no TFLite interpreter is installed.
    """
    if (model_content is None) == (model_path is None):
        raise ValueError("pass exactly one of model_content and model_path")
    loaded = None if delegate is None else delegate.loaded
    global _FIRST_INTERPRETER
    with silenced() if _FIRST_INTERPRETER else contextlib.nullcontext():  # XNNPACK says hello once
        try:
            it = interpreter_class()(model_content=model_content, model_path=None if model_path is None else
                                     str(model_path), num_threads=num_threads,
                                     experimental_delegates=None if loaded is None else [loaded])
            it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            if loaded is None:
                raise
            raise BadInput(delegate.name, f"cannot run this model: {_reason(e, delegate.name)}") from None
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
