"""Turn the stream's `--model` and source flags into a bundle and a frame source.

A `.tflite` path is used as is.  A registered name means the cached export in `cache_dir()`; when it is
missing it is built on first use, which needs the workstation extra (`pip install edge-cbn[convert]`):
the converter is imported only then.  On a board, copy a converted model over instead (device/README.md).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import click

from ..runtime.bundle import calibration_path, load_bundle, sidecar_path, sweep_path
from ..runtime.errors import BadInput
from ..runtime.validation import regular_file
from ..runtime.paths import cache_dir
from .options import StreamError
from .sources import Prefetched, SourceError, open_source, opencv_quiet

DEFAULT_MODEL = "efficientnet_lite0"


class ModelNotFound(BadInput):
    """`--model` names no file and no registered model that can be converted here."""


def resolve_model(model: str | None, *, echo=print) -> Path:
    """`NAME|FILE.tflite` -> the path of an exported bundle (converting a registered name once)."""
    model = model or DEFAULT_MODEL
    if model.endswith(".tflite"):
        path = Path(model)
        if not path.exists() and not path.is_symlink():
            raise ModelNotFound(model, "model file does not exist")
        return regular_file(path)  # a directory, FIFO or device says so
    path = cache_dir() / f"{model}.tflite"
    converter_here = importlib.util.find_spec("tensorflow") is not None
    if all(p.is_file() for p in (path, sidecar_path(path), calibration_path(path))) and (
            sweep_path(path).is_file() or not converter_here):  # an export from before the sweep: redone once
        return path
    if not converter_here:
        raise ModelNotFound(
            model, "not converted yet and TensorFlow is not installed here: convert it on a workstation "
            f"with `python tools/convert.py --model {model} -o {model}.tflite` and pass --model {model}.tflite")
    converter = importlib.import_module("edge_cbn.convert.build")  # the workstation side, on demand
    echo(f"first use of {model}: converting it once into {path}", file=sys.stderr)
    try:
        spec, keras_model = converter.build_model(model, quiet=False)
    except (KeyError, converter.MissingWeights) as e:
        raise ModelNotFound(model, str(e.args[0])) from None
    return converter.export_model(spec, keras_model, path, quiet=False)


def load_model(model: str | None, echo=None):
    """`--model NAME|FILE.tflite` -> (bundle, display name); a missing model is `ModelNotFound`, an unusable
    one the `BadInput` of `load_bundle` (each one line naming the file, from the CLI).  Messages (a first
    use's conversion) go to stderr."""
    path = resolve_model(model, echo=echo or (lambda *a, **k: click.echo(*a, **k)))
    bundle = load_bundle(path)
    return bundle, bundle.meta.get("model") or Path(path).stem


def open_frames(camera=None, video=None, images=None, loop=False, width=640, height=480, picamera2=False):
    """The frame source, read one frame ahead in a thread; no source = the bundled sample clip, looped."""
    if camera is None and video is None and images is None:
        loop = True
    if (camera is not None and str(camera).isdigit() and sys.platform.startswith("linux")
            and not (picamera2 and int(camera) == 0) and not os.path.exists(f"/dev/video{int(camera)}")):
        raise StreamError(f"camera {camera} not found: /dev/video{int(camera)} does not exist")
    try:
        with opencv_quiet():  # OpenCV's own warnings at open
            return Prefetched(open_source(camera=camera, video=video, images=images, loop=loop, width=width,
                                          height=height, picamera2=picamera2))
    except (SourceError, ValueError, FileNotFoundError) as e:
        raise StreamError(str(e)) from None


